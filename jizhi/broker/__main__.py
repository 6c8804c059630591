"""``python -m jizhi.broker --plan FILE``: the broker process (started by jizhid; jizhi/broker/loop.py)."""
from jizhi import lifeline

lifeline.hold()   # first, before the imports below: this process must never outlive jizhid

import sys  # noqa: E402

from jizhi.broker.loop import main  # noqa: E402

sys.exit(main())
