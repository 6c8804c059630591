"""What every control command is: a name, a docstring that is its ``--help``, validation, execution."""
from jizhi.control import ControlError


class Command:
    """A control command (one class per command, one module per class).

    ``name`` is the command on the wire (``{v, cmd, args}``, jizhi/control.py) and the jizhictl command
    that sends it; the class docstring is that jizhictl command's ``--help`` text (jizhictl shows it);
    ``validate(args)`` raises ControlError for arguments it refuses and returns them; ``execute(sup,
    args)`` runs in the supervisor loop and returns the reply's result. A command changes desired
    state; the loop's reconcile pass changes the world (docs/architecture.md, "Resource manager").
    """
    name = None

    def validate(self, args):
        return args

    def execute(self, sup, args):
        raise NotImplementedError(f"{type(self).__name__}.execute")


def model_version(args, need_version):
    """``(model, version)`` of a pin or unpin; ``need_version``: a version must be given."""
    model = args.get("model")
    if not isinstance(model, str) or not model:
        raise ControlError("name a model")
    v = args.get("version")
    if need_version and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise ControlError("the version must be a positive integer")
    return model, v
