"""`tools/run.py MODULE.FUNC ...`: Metta's runner contract, in both of Metta's command-line syntaxes.

    September 2025:  run.py experiments.recipes.x.train --args run=base --overrides trainer.batch_size=1536
    current:         run.py experiments.recipes.x.train run=base trainer.batch_size=1536

The function is imported and called with the arguments its signature names; every other `key=value` is an
override of the returned tool (a dotted path into its fields), validated before the tool is invoked.
`run.py MODULE.FUNC [key=value ...] --help` lists the tool's override paths with their values and bounds.
"""

import importlib
import inspect
import sys
from typing import TYPE_CHECKING

from metta_collapse.errors import ConfigError

if TYPE_CHECKING:
    from metta_collapse.training.config import Tool

HELP = ("-h", "--help")

USAGE = (
    "usage: run.py MODULE.FUNC [--args key=value ...] [--overrides path=value ...]\n"
    "       run.py MODULE.FUNC [key=value ...]"
)


def parse_command_line(argv: list[str]) -> tuple[str, dict[str, str], list[tuple[str, str]], bool]:
    """-> (target, args, overrides, september_syntax). In the current syntax every pair lands in `args`."""
    if not argv or argv[0].startswith("-") or "." not in argv[0]:
        raise ConfigError(f"expected MODULE.FUNC as the first argument\n{USAGE}")
    target, rest = argv[0], argv[1:]
    september = "--args" in rest or "--overrides" in rest
    section = None if september else "--args"
    args: dict[str, str] = {}
    overrides: list[tuple[str, str]] = []
    for token in rest:
        if token in ("--args", "--overrides"):
            section = token
            continue
        key, sep, value = token.partition("=")
        if section is None or not sep or not key:
            raise ConfigError(f"unexpected argument {token!r}: expected key=value\n{USAGE}")
        if key in args or key in dict(overrides):
            raise ConfigError(f"{key} is given twice: give it once")
        value = _unquote(value)
        if section == "--args":
            args[key] = value
        else:
            overrides.append((key, value))
    return target, args, overrides, september


def _unquote(value: str) -> str:
    """`run='base'` arrives quoted when no shell strips the quotes."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def load_function(target: str) -> object:
    module_name, _, function_name = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise ConfigError(f"cannot import {module_name!r}: {error}") from None
        raise
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{module_name!r} has no function {function_name!r}")
    return function


def build_tool(argv: list[str]) -> "Tool":
    """Parse the command line, call the recipe function and apply the overrides: everything but invoking."""
    target, args, overrides, september = parse_command_line(argv)
    # imported here: the recipe needs them anyway, `--help` and a malformed command line do not
    from pydantic import TypeAdapter, ValidationError

    from metta_collapse.training.config import Tool, apply_override

    function = load_function(target)
    parameters = inspect.signature(function).parameters
    kwargs = {}
    leftover: list[tuple[str, str]] = []
    for key, value in args.items():
        if key not in parameters:
            leftover.append((key, value))
            continue
        annotation = parameters[key].annotation
        try:
            if annotation is not inspect.Parameter.empty:
                value = TypeAdapter(annotation).validate_python(value)
        except ValidationError as error:
            raise ConfigError(f"invalid value for argument {key}: {value!r} ({error.errors()[0]['msg']})") from None
        kwargs[key] = value
    try:
        tool = function(**kwargs)
    except ValidationError as error:  # a recipe argument that sets a field (e.g. `run`) with a bad value
        problem = error.errors()[0]
        field = ".".join(str(part) for part in problem["loc"]) or "the tool"
        raise ConfigError(f"invalid value for {field}: {problem.get('input')!r} ({problem['msg']})") from None
    if not isinstance(tool, Tool):
        raise ConfigError(f"{target} returned {type(tool).__name__}, not a tool")
    if september:
        # --args the function does not take may still name a field of the tool (e.g. `run`)
        for key, _ in leftover:
            if key not in type(tool).model_fields:
                raise ConfigError(
                    f"unknown argument {key!r}: {target} takes {', '.join(parameters) or 'no arguments'} "
                    f"and the tool has no field {key!r}"
                )
    for key, value in leftover + overrides:
        apply_override(tool, key, value)
    tool._given = {key for key, _ in leftover + overrides}
    return tool


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in HELP:
        print(f"{__doc__}\n{USAGE}")
        return 0
    try:
        if any(token in HELP for token in argv[1:]):
            from metta_collapse.training.config import field_lines

            tool = build_tool([token for token in argv if token not in HELP])
            print(f"{argv[0]}: {type(tool).__name__}; override paths, values, bounds:")
            print("\n".join(f"  {line}" for line in field_lines(tool)))
            return 0
        tool = build_tool(argv)
        result = tool.invoke()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if result is None else result
