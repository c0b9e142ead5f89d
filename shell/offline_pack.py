"""Pack what a GPU machine without network needs to run this checkout's GPU benchmarks (bench-gpu and the
CUDA tilt sweep, shell/offline-bench.sh): wheels, for that machine's Python, of the distributions the
benchmarks import that its python lacks, and SmolLM2-135M's config and tokenizer (not its weights: the
benchmark times a randomly initialised model of the same shapes, which costs the same).

    make -C shell offline-pack [HAVE=shell/gpu-image.example.txt] [PACK_PYTHON=3.12]

HAVE lists what the target's python holds, as `pip list --format=freeze` prints it there (name==version,
or a bare name when the version is not known; # comments). Following the requirements down from this
package, a distribution that the benchmarks import here is carried when the target lacks it or holds a
version the requirement excludes (a bare name counts as satisfying). torch is never carried (the target's
CUDA build is the point). The pack goes to .offline-pack/ (git-ignored) with a
manifest.json; copy it into the checkout on the target.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canonical
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the GPU benchmarks import (bench_gpu.py, bench_fit.py and the ssae-fit runs the sweep starts)
MODULES = ("ssae_common.data.models", "ssae_common.data.stage", "ssae_common.eval.splice", "ssae_common.sae",
           "ssae_tools.fit", "transformer_lens.model_bridge", "transformers.models.llama", "h5py", "safetensors")
NEVER = {"torch"}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64",
                                                                                       "manylinux1_x86_64"]
# files of a Hugging Face model folder that are not its weights
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def read_have(path: str) -> dict[str, str | None]:
    """{canonical name: version or None} from a `pip list --format=freeze`-like file."""
    have = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*(\S+))?", line)
            if not m:
                raise SystemExit(f"offline-pack: {path}:{number}: expected name or name==version, got {line!r}")
            have[canonical(m.group(1))] = m.group(2)
    return have


def imported_distributions(modules=MODULES) -> dict[str, str]:
    """{canonical name: installed version} of the distributions whose modules `modules` import here."""
    for module in modules:
        importlib.import_module(module)
    owners = md.packages_distributions()
    found = {}
    for top in {name.split(".")[0] for name in sys.modules}:
        for dist in owners.get(top, ()):
            found[canonical(dist)] = md.version(dist)
    return found


def requirements(name: str, python_version: str) -> list[Requirement]:
    """The distribution's unconditional requirements on a target with that Python version."""
    env = {**default_environment(), "python_version": python_version, "python_full_version": python_version + ".0",
           "extra": ""}
    reqs = [Requirement(r) for r in md.requires(name) or ()]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def to_carry(used: dict[str, str], have: dict[str, str | None], python_version: str, root: str = "ssae"
             ) -> dict[str, str]:
    """{name: version} to carry: from `root`'s requirements down, each one imported here (`used`) that the
    target lacks or holds at a version the requirement excludes; a carried one's requirements are followed
    in turn (one the target satisfies brings its own)."""
    carry: dict[str, str] = {}
    todo = [root]
    while todo:
        for req in requirements(todo.pop(), python_version):
            dep = canonical(req.name)
            if dep not in used or dep in NEVER or dep in carry:
                continue
            there = dep in have and have[dep]
            if dep in have and (there is None or req.specifier.contains(Version(there), prereleases=True)):
                continue
            carry[dep] = used[dep]
            todo.append(dep)
    return dict(sorted(carry.items()))


def fetch(name: str, version: str, python_version: str, dest: str) -> str:
    """A wheel of name==version for the target: a binary one from the index, else one built here from the
    sdist (pure Python ones); the file name."""
    before = set(os.listdir(dest))
    pin = f"{name}=={version}"
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                          "--python-version", python_version, "--implementation", "cp",
                          *[a for p in PLATFORMS for a in ("--platform", p)], "-d", dest, pin],
                         capture_output=True, text=True)
    if got.returncode != 0:
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dest, pin],
                               capture_output=True, text=True)
        if built.returncode != 0:
            raise SystemExit(f"offline-pack: no wheel of {pin} for Python {python_version}: "
                             f"{(got.stderr or built.stderr).strip().splitlines()[-1]}")
    new = sorted(set(os.listdir(dest)) - before)
    if len(new) != 1 or not new[0].endswith(".whl"):
        raise SystemExit(f"offline-pack: {pin}: expected one wheel, got {new}")
    if "-none-any" not in new[0] and f"cp{python_version.replace('.', '')}" not in new[0] and "abi3" not in new[0]:
        raise SystemExit(f"offline-pack: {pin}: {new[0]} is not for Python {python_version}")
    return new[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--have", default=os.path.join(ROOT, "shell", "gpu-image.example.txt"),
                   help="what the target's python holds (pip list --format=freeze); "
                        "default: shell/gpu-image.example.txt")
    p.add_argument("--python-version", default="3.12", help="the target's Python, major.minor (default 3.12)")
    p.add_argument("--model", default="smollm2", help="model whose config and tokenizer to pack (default smollm2)")
    p.add_argument("--out", default=os.path.join(ROOT, ".offline-pack"), help="the pack folder (replaced)")
    p.add_argument("--max-mib", type=float, default=None, help="fail when the pack is larger than this")
    args = p.parse_args(argv)
    try:  # bad input: one line, exit 2, nothing written
        if not re.fullmatch(r"3\.\d+", args.python_version):
            raise SystemExit(f"offline-pack: --python-version {args.python_version!r}: expected major.minor, "
                             "e.g. 3.12")
        if not os.path.isfile(args.have):
            raise SystemExit(f"offline-pack: --have {args.have}: no such file")
        have = read_have(args.have)
    except SystemExit as e:
        print(e.code, file=sys.stderr)
        sys.exit(2)
    carry = to_carry(imported_distributions(), have, args.python_version)

    from ssae_common.core.outputs import sha256_file
    from ssae_common.data.models import resolve_model_path

    model = resolve_model_path(args.model)  # a bundled alias is converted here once (cached)
    tmp = tempfile.mkdtemp(prefix=".offline-pack.", dir=os.path.dirname(os.path.abspath(args.out)))
    try:
        os.makedirs(os.path.join(tmp, "wheels"))
        wheels = {}
        for name, version in carry.items():
            print(f"offline-pack: {name}=={version}", file=sys.stderr, flush=True)
            wheels[name] = fetch(name, version, args.python_version, os.path.join(tmp, "wheels"))
        os.makedirs(os.path.join(tmp, "model"))
        files = [n for n in MODEL_FILES if os.path.exists(os.path.join(model, n))]
        if "config.json" not in files:
            raise SystemExit(f"offline-pack: {model}: no config.json")
        for name in files:
            shutil.copy(os.path.join(model, name), os.path.join(tmp, "model", name))
        sizes = {os.path.relpath(os.path.join(d, n), tmp): os.path.getsize(os.path.join(d, n))
                 for d, _, names in os.walk(tmp) for n in names}
        total = sum(sizes.values())
        manifest = {"python_version": args.python_version, "have": os.path.abspath(args.have),
                    "model": args.model, "model_files": files, "weights": "none (bench_gpu.py --random-weights)",
                    "wheels": {n: {"version": carry[n], "file": w, "sha256": sha256_file(os.path.join(tmp, "wheels", w))}
                               for n, w in wheels.items()},
                    "bytes": total}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        if args.max_mib is not None and total > args.max_mib * 2 ** 20:
            raise SystemExit(f"offline-pack: the pack is {total / 2 ** 20:.1f} MiB, over --max-mib {args.max_mib}")
        if os.path.exists(args.out):
            shutil.rmtree(args.out)
        os.rename(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"offline-pack: {args.out}: {len(wheels)} wheels ({', '.join(wheels) or 'none'}), the model's "
          f"{len(files)} files, {total / 2 ** 20:.1f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
