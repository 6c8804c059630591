"""The benchmark and offline tools: load generation and `jizhictl bench`,
`bench-reload`, `bench-shape`, the micro-benchmark, the structured-features
benchmark (`structbench`), the soak run, the tuner, the demo and DLRM
generators, the reference scorer, the model importer and the local Redis
cluster. The server (`jizhid`, the broker, the workers) never imports this
package; `jizhid --demo` calls into it through `jizhi.tools.demo.init_demo` only."""
