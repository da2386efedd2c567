"""`mkmailimage lock SITE`: pin every input of a Debian image in `SITE.lock.json` beside the
site file, and read that lock back for `build --locked`.

A lock holds: the exact version, architecture, sha256, size and pool file name of every Debian
package the image installs (taken from the base layer's dpkg status, which is what apt really
resolved, and looked up in the mirror's signed Packages index: InRelease -> Packages.xz ->
.deb), the netboot installer package, the OpenBSD SHA256.sig and set hashes when an OpenBSD
source is configured, the epoch for every timestamp, and the seed every UUID derives from (with
the derived ids written out for reading).

`build --locked` checks the lock against the mirror's signed index before anything is written
and names every package the mirror no longer has (or has with another hash); then apt is
pinned to exactly those versions, and the layer it gets is compared with the lock again.
"""
from __future__ import annotations

import json
import lzma
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError, MkMailImageError

FORMAT = "mkmailimage-lock/1"
PREFERENCES = "etc/apt/preferences.d/mkmailimage-lock.pref"


class LockError(MkMailImageError):
    """A lock file is missing, malformed, or asks for what the mirror does not have."""

    exit_code = 5


@dataclass
class Lock:
    path: Path
    data: dict

    @property
    def epoch(self) -> int:
        return self.data["epoch"]

    @property
    def seed(self) -> str:
        return self.data["seeds"]["seed"]

    @property
    def suite(self) -> str:
        return self.data["debian"]["suite"]

    @property
    def include(self) -> list[str] | None:
        """The packages the build asked mmdebstrap for when the lock was made."""
        return self.data["debian"].get("include")

    @property
    def packages(self) -> dict[str, dict]:
        """'name:arch' -> {package, architecture, version, sha256, size, filename}."""
        return self.data["debian"]["packages"]

    def pins(self) -> dict[str, str]:
        return {p["package"]: p["version"] for p in self.packages.values()}


def lock_path(site_path: Path) -> Path:
    """site.yaml -> site.lock.json, beside it."""
    site_path = Path(site_path)
    return site_path.with_name(site_path.stem + ".lock.json")


# ---------------------------------------------------------------- the mirror's signed index

def signed_index(mirror: str, suite: str) -> tuple[dict, dict[tuple[str, str], dict]]:
    """(Release fields, {(package, arch): {version: stanza}}) from the mirror's verified
    Packages.xz indexes for amd64 (the chain builder.debian.archive checks)."""
    from . import paths
    from .debian import archive
    mirror = mirror.rstrip("/")
    release = archive.verified_release(mirror, suite)
    index: dict[tuple[str, str], dict] = {}
    names = archive.packages_indexes(release)
    if not names:
        raise LockError(f"{mirror}/dists/{suite}/InRelease lists no main Packages.xz for amd64")
    for name in names:
        sha, size = release["SHA256"][name]
        blob = archive.fetch_verified(f"{mirror}/dists/{suite}/{name}", sha, size, paths.cache_dir(),
                                      lambda _: None)
        text = lzma.decompress(blob.read_bytes()).decode("utf-8", errors="replace")
        for st in archive.parse_packages(text):
            if {"Package", "Version", "Architecture", "SHA256", "Filename"} <= st.keys():
                index.setdefault((st["Package"], st["Architecture"]), {})[st["Version"]] = st
    return release, index


def pinned_entry(stanza: dict) -> dict:
    return {"package": stanza["Package"], "architecture": stanza["Architecture"],
            "version": stanza["Version"], "sha256": stanza["SHA256"], "size": int(stanza.get("Size", 0)),
            "filename": stanza["Filename"]}


def dpkg_installed(status_text: str) -> list[tuple[str, str, str]]:
    """(package, architecture, version) of every installed package in a dpkg status file."""
    from .debian.archive import parse_packages   # the same deb822 stanzas as Packages files
    out = []
    for fields in parse_packages(status_text):
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            out.append((fields["Package"], fields.get("Architecture", ""), fields.get("Version", "")))
    return sorted(out)


def resolve(installed: list[tuple[str, str, str]], index) -> dict[str, dict]:
    """Look each installed package up in the signed index; name every one it lacks."""
    pinned, missing = {}, []
    for name, arch, version in installed:
        stanza = index.get((name, arch), {}).get(version)
        if stanza is None:
            have = sorted(index.get((name, arch), {}))
            missing.append(f"{name} {version} ({arch})" + (f": the mirror has {', '.join(have)}" if have
                                                            else ": not in the mirror"))
            continue
        pinned[f"{name}:{arch}"] = pinned_entry(stanza)
    if missing:
        raise LockError("the mirror's signed Packages index lacks installed packages: " + "; ".join(missing))
    return dict(sorted(pinned.items()))


# ---------------------------------------------------------------- writing a lock

def make_lock(site, site_path: Path, *, installed, include: list[str], epoch: int, seed: str, mirror: str,
              source: str) -> dict:
    from .debian import disk
    suite = site.model.debian.suite
    release, index = signed_index(mirror, suite)
    seeds = disk.Seeds.from_string(seed)
    data = {
        "format": FORMAT,
        "site": {"file": Path(site_path).name, "domain": site.domain},
        "made_from": source,
        # the builder (its overlay templates, its recipe) is an input too: same image only from
        # the same builder; build --locked says so when it differs
        "builder": _builder_id(),
        "epoch": epoch,
        "seeds": {"seed": seed, **{k: v for k, v in seeds.__dict__.items()}},
        "debian": {
            "suite": suite,
            # the build host's mirror is never written down; a site mirror is the user's own
            "mirror": site.model.debian.mirror or "build host's apt mirror",
            "release": {k: release.get(k, "") for k in ("Origin", "Suite", "Codename", "Version", "Date")},
            "include": sorted(set(include)),
            "packages": resolve(installed, index),
            "netboot": _netboot(index, suite),
        },
        "openbsd": _openbsd(site),
    }
    return data


def _builder_id() -> dict:
    from .build import BUILDER_VERSION, _git_commit
    return {"version": BUILDER_VERSION, "git": _git_commit()}


def builder_note(lock: Lock) -> str | None:
    """A warning when the lock was made by another builder version or commit."""
    was, now = lock.data.get("builder") or {}, _builder_id()
    if was and (was.get("version"), was.get("git")) != (now["version"], now["git"]):
        return (f"note: {lock.path.name} was made with mkmailimage {was.get('version')} ({was.get('git')}), "
                f"this is {now['version']} ({now['git']}): the image can differ where the builder changed")
    return None


def _netboot(index, suite: str) -> dict:
    from .debian import netboot
    try:
        name = netboot.package_name(suite)
    except BuildError as e:
        return {"locked": False, "reason": str(e)}
    versions = index.get((name, "all"), {}) or index.get((name, "amd64"), {})
    if not versions:
        return {"locked": False, "reason": f"{name} is not in the mirror's index"}
    newest = _newest(versions)
    return {"locked": True, **pinned_entry(versions[newest])}


def _newest(versions: dict) -> str:
    """The highest Debian version, compared by dpkg itself."""
    import functools

    def cmp(a: str, b: str) -> int:
        if a == b:
            return 0
        gt = subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0
        return 1 if gt else -1
    return max(versions, key=functools.cmp_to_key(cmp))


def _openbsd(site) -> dict:
    o = site.model.openbsd
    if not (o.mirror or o.sets_dir):
        return {"locked": False, "reason": "no openbsd.mirror or openbsd.sets_dir in the site file",
                "version": o.version}
    from .openbsd import sets
    try:
        src = sets.source_for(o.version, o.mirror, o.sets_dir)
        key_file = (site.path.parent / o.signify_key) if o.signify_key else None   # relative to the site file
        key = sets.release_key(o.version, "base", key_file, site.model.debian.mirror)
        sig, table = sets.signed_table(src.sets, src.is_dir, key, f"OpenBSD {o.version}")
        wanted = sets.set_names(o.version)
        lacking = [n for n in wanted if n not in table]
        if lacking:
            raise BuildError(f"SHA256.sig does not list {', '.join(lacking)}")
        return {"locked": True, "version": o.version, "sha256_sig": sets.sha256_file(sig),
                "sets": {n: table[n] for n in sorted(wanted)}}
    except MkMailImageError as e:
        return {"locked": False, "reason": str(e), "version": o.version}


def dumps(data: dict) -> str:
    return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def write_lock(path: Path, data: dict) -> None:
    from .cache import write_atomic
    write_atomic(Path(path), dumps(data).encode())


# ---------------------------------------------------------------- where the package list comes from

def installed_from_layer(site, *, epoch: int, no_cache: bool = False, progress=None):
    """The base layer a build of this site uses (built now if not cached): its dpkg status."""
    from .debian.bootstrap import BaseInputs, base_layer, build_mirror, packages_for
    from .progress import Progress
    d = site.model.debian
    inputs = BaseInputs(suite=d.suite, mirror=build_mirror(d.mirror), epoch=epoch,
                        packages=packages_for(site))
    tar, _ = base_layer(inputs, progress or Progress(), no_cache=no_cache)
    return dpkg_installed(layer_status(tar)), inputs.mirror, inputs.packages


def layer_status(tar: Path) -> str:
    for member in ("./var/lib/dpkg/status", "var/lib/dpkg/status"):
        out = subprocess.run(["tar", "-xOf", str(tar), member], capture_output=True)
        if out.returncode == 0 and out.stdout:
            return out.stdout.decode("utf-8", "replace")
    raise BuildError(f"{tar}: no var/lib/dpkg/status in the base layer")


def installed_from_image(image: Path) -> tuple[list, dict]:
    """dpkg status read from the image's root file system (no boot), plus its build manifest."""
    from .imageread import disk as diskread
    from .imageread.ext4 import read_text_file
    image = Path(image)
    manifest_file = image.with_name(image.name.rsplit(".", 1)[0] + ".manifest.json")   # NAME.qcow2 -> NAME.manifest.json
    if not manifest_file.exists():
        raise LockError(f"lock --from-image: {manifest_file} (the build manifest beside the image) is "
                        "missing; it records the epoch and seed the image was built with")
    build_manifest = json.loads(manifest_file.read_text())
    with diskread.raw_view(image) as raw:
        status = read_text_file(raw, "/var/lib/dpkg/status")
    if status:
        return dpkg_installed(status), build_manifest
    raise LockError(f"lock --from-image: {image} has no ext4 file system with /var/lib/dpkg/status")


def cmd_lock(args) -> int:
    from .debian.bootstrap import DEFAULT_EPOCH, build_mirror
    from .site import load_site
    site_path = Path(args.site)
    site = load_site(site_path)
    image = getattr(args, "from_image", None)
    if image:
        installed, bm = installed_from_image(Path(image))
        inputs = bm.get("inputs", {})
        try:
            epoch, seed = int(inputs["source_date_epoch"]), inputs["seeds"]["seed"]
            include = inputs["base_layer"]["packages_requested"]
        except (KeyError, TypeError, ValueError):
            raise LockError(f"lock --from-image: the build manifest of {image} lacks inputs.source_date_epoch, "
                            "inputs.seeds.seed or inputs.base_layer.packages_requested") from None
        mirror, source = build_mirror(site.model.debian.mirror), f"image {Path(image).name}"
    else:
        import os
        env_epoch = os.environ.get("SOURCE_DATE_EPOCH")
        epoch = int(env_epoch) if env_epoch else DEFAULT_EPOCH
        seed = site.hostname
        installed, mirror, include = installed_from_layer(site, epoch=epoch)
        source = "base layer"
    data = make_lock(site, site_path, installed=installed, include=include, epoch=epoch, seed=seed, mirror=mirror,
                     source=source)
    out = lock_path(site_path)
    write_lock(out, data)
    ob = "locked" if data["openbsd"]["locked"] else "not locked (" + data["openbsd"]["reason"] + ")"
    print(f"{out}: {len(data['debian']['packages'])} Debian packages, epoch {epoch}, seed {seed!r}; "
          f"OpenBSD sets {ob}")
    return 0


# ---------------------------------------------------------------- reading a lock, build --locked

def read_lock(site_path: Path) -> Lock:
    path = lock_path(site_path)
    if not path.exists():
        raise LockError(f"{path}: no lock file; make one with `mkmailimage lock {site_path}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LockError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    if data.get("format") != FORMAT:
        raise LockError(f"{path}: format is {data.get('format')!r}, this builder reads {FORMAT!r}")
    for field, kind in (("epoch", int), ("seeds", dict), ("debian", dict)):
        if not isinstance(data.get(field), kind):
            raise LockError(f"{path}: field '{field}' is missing or not a {kind.__name__}")
    if not isinstance(data["seeds"].get("seed"), str):
        raise LockError(f"{path}: field 'seeds.seed' is missing")
    pkgs = data["debian"].get("packages")
    if not isinstance(pkgs, dict) or not pkgs:
        raise LockError(f"{path}: field 'debian.packages' is missing or empty")
    for key, p in pkgs.items():
        for f in ("package", "architecture", "version", "sha256", "filename"):
            if not isinstance(p, dict) or not isinstance(p.get(f), str):
                raise LockError(f"{path}: debian.packages.{key}: field '{f}' is missing")
    return Lock(path, data)


def check_mirror(lock: Lock, mirror: str, site_suite: str | None = None) -> None:
    """Refuse (naming each one) locked packages the mirror's signed index no longer has."""
    if site_suite and site_suite != lock.suite:
        raise LockError(f"{lock.path}: locked for suite {lock.suite}, the site file says {site_suite}; "
                        "make the lock again")
    _, index = signed_index(mirror, lock.suite)
    problems = []
    for key, p in lock.packages.items():
        have = index.get((p["package"], p["architecture"]), {})
        st = have.get(p["version"])
        if st is None:
            problems.append(f"{p['package']} {p['version']} ({p['architecture']})"
                            + (f": the mirror has only {', '.join(sorted(have))}" if have else ": not in the mirror"))
        elif st["SHA256"] != p["sha256"]:
            problems.append(f"{p['package']} {p['version']} ({p['architecture']}): sha256 {st['SHA256']} "
                            f"in the mirror, {p['sha256']} in the lock")
    if problems:
        raise LockError(f"build --locked: the mirror no longer has what {lock.path.name} pins "
                        f"({len(problems)} of {len(lock.packages)}): " + "; ".join(problems))


def apt_preferences_text(pins: dict[str, str]) -> str:
    """apt pins making exactly these versions the candidates (priority > 1000 even downgrades)."""
    stanzas = [f"Package: {name}\nPin: version {version}\nPin-Priority: 1001\n"
               for name, version in sorted(pins.items())]
    return "\n".join(stanzas)


def locked_base_layer(lock: Lock, inputs, progress, no_cache: bool = False) -> tuple[Path, bool]:
    """The base layer for a locked build: a cached layer whose packages are exactly the lock's
    (the unpinned one, when the mirror has not moved since it was made), else one built with
    apt pinned to the lock. Either way checked against the lock before use."""
    import dataclasses
    from .debian.bootstrap import base_layer, layer_path
    unpinned = layer_path(dataclasses.replace(inputs, pins={}))
    if not no_cache and unpinned.exists():
        try:
            check_layer(lock, unpinned)
            return unpinned, True
        except LockError:
            pass
    tar, reused = base_layer(dataclasses.replace(inputs, pins=lock.pins()), progress, no_cache=no_cache)
    check_layer(lock, tar)
    return tar, reused


def check_layer(lock: Lock, tar: Path) -> None:
    """The base layer must hold exactly the locked packages (apt added or changed nothing)."""
    got = {f"{n}:{a}": v for n, a, v in dpkg_installed(layer_status(tar))}
    want = {k: p["version"] for k, p in lock.packages.items()}
    extra = sorted(set(got) - set(want))
    lacking = sorted(set(want) - set(got))
    changed = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    if extra or lacking or changed:
        parts = []
        if lacking:
            parts.append("not installed: " + ", ".join(lacking))
        if extra:
            parts.append("installed but not locked: " + ", ".join(extra))
        if changed:
            parts.append("other version: " + ", ".join(f"{k} {got[k]} (lock {want[k]})" for k in changed))
        raise LockError(f"build --locked: the base layer differs from {lock.path.name}: " + "; ".join(parts))
