class CollapseError(RuntimeError):
    """A model, plan, input or optimizer the engine cannot handle; raised before anything is changed."""


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""
