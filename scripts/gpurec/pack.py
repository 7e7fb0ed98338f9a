"""``gpu_record.py pack``: the carry folder (data packs and pure-Python packages)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from gpurec.common import CARRY_LIMIT_MIB, SITE_PACKAGES, folder_bytes, mib


def pack(args) -> int:
    import warnings

    from taskloom.data import build_data, packed
    from taskloom.data.mtfl import MTFLOptions
    from taskloom.data.utkface import UTKFaceOptions

    out, shared = Path(args.out), Path(args.data)
    budget = args.budget_mib * 2**20
    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    manifest: dict[str, Any] = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_mib": args.budget_mib,
                                "source": str(shared.resolve()), "limit": args.limit}
    if not args.no_site:
        manifest["site"] = write_site(out / "site.zip")
        print(f"site.zip: {', '.join(manifest['site']['packages'])} ({mib((out / 'site.zip').stat().st_size)})")
    # MTFL: everything, 40x40 grey (the CPU record's crop and size)
    mopts = MTFLOptions(root=str(shared / "mtfl"), limit=args.limit, val_size=1000 if args.limit is None else
                        max(4, args.limit // 5))
    mtfl = packed.bundle_arrays(build_data(mopts))
    packed.write_pack(out / "data" / "mtfl", "mtfl", mtfl, source={"dataset": "mtfl", "size": mopts.size,
                      "crop_scale": mopts.crop_scale, "val_size": mopts.val_size, "limit": args.limit})
    print(packed.describe(out / "data" / "mtfl"))
    # UTKFace at 32x32 RGB (the CPU record's size): validation and test complete, then as many
    # training faces (the data.train_size draw) as the remaining budget holds
    uopts = UTKFaceOptions(root=str(shared / "utkface64"), size=32, limit=args.limit if args.limit is None else 4 * args.limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 3 malformed names are skipped, as in the CPU record
        utk = packed.bundle_arrays(build_data(uopts))
    source = {"dataset": "utkface", "size": 32, "limit": uopts.limit}
    folder = out / "data" / "utkface"
    n_train = len(utk["train"]["images"])
    size = n_train if args.utk_train is None else min(args.utk_train, n_train)
    while True:
        packed.write_pack(folder, "utkface", utk, source=source, train_size=size)
        total = folder_bytes(out)
        if total <= budget or size <= 1:
            break
        train_bytes = (folder / "train_images.med.xz").stat().st_size
        per_face = train_bytes / size
        new = max(1, int(size - (total - budget) / per_face * 1.02) - 1)
        print(f"utkface: {size} training faces make {mib(total)} > {args.budget_mib} MiB; trying {new}")
        size = new
    print(packed.describe(folder))
    total = folder_bytes(out)
    manifest["bytes"] = total
    manifest["utkface_train"] = {"packed": size, "of": n_train}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{out}: {mib(total)} in all (budget {args.budget_mib} MiB; the device takes {CARRY_LIMIT_MIB:.0f} MiB "
          f"with the working tree), {time.perf_counter() - started:.0f} s")
    if total > budget:
        print(f"over budget: {mib(total)} > {args.budget_mib} MiB", file=sys.stderr)
        return 1
    return 0


def write_site(path: Path) -> dict[str, Any]:
    """Zip the pure-Python files of SITE_PACKAGES from this interpreter's site-packages."""
    import importlib.metadata as md

    names, versions = [], {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in SITE_PACKAGES:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None and not spec.submodule_search_locations:
                print(f"site.zip: {name} is not installed here; skipped")
                continue
            if spec.submodule_search_locations:
                root = Path(list(spec.submodule_search_locations)[0])
                files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                         and p.suffix not in (".so", ".pyd", ".pyc")]
                for p in files:
                    zf.write(p, f"{name}/{p.relative_to(root).as_posix()}")
            else:
                zf.write(spec.origin, Path(spec.origin).name)
            names.append(name)
            dist = {"yaml": "pyyaml", "_pytest": "pytest", "typing_extensions": "typing_extensions",
                    "lightning_utilities": "lightning-utilities"}.get(name, name)
            try:
                versions[name] = md.version(dist)
            except md.PackageNotFoundError:
                versions[name] = None
    return {"packages": names, "versions": versions}
