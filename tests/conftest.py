import contextlib
import importlib.metadata
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# PufferLib 3.0 (September Metta's; not pufferlib-core) links `resources` into the working folder when first imported:
# import it from a scratch folder, so that the tests leave nothing in the project
with contextlib.suppress(importlib.metadata.PackageNotFoundError):
    importlib.metadata.distribution("pufferlib")
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        import pufferlib  # noqa: F401
