"""Where the project's templates and the user's caches live."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ROOT / "overlays"          # mail configs and firstboot scripts, rendered into images
AUTOINSTALL = ROOT / "autoinstall"    # installer answer files
TEMPLATES = ROOT / "builder" / "templates"  # files the builder writes for the user (site.yaml)
IMAGES = ROOT / "images"


def cache_dir() -> Path:
    """Build cache: MKMAILIMAGE_CACHE, else $XDG_CACHE_HOME/mkmailimage."""
    env = os.environ.get("MKMAILIMAGE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mkmailimage"
