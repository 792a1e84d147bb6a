#!/usr/bin/env python3
"""The Python reference implementation's client (python-tuf's ngclient) reading a repository
that `upgradectl repo` wrote: an independent check of our writer (tests/tuf.rs).

usage: client.py BASE_URL TRUSTED_ROOT WORKDIR TARGET...
Refreshes the metadata from BASE_URL/metadata/ and prints, as JSON, each target's length and
sha256 (null when it is not listed). Exits 1 with the error when the metadata does not verify.
"""

import json
import os
import sys

from tuf.ngclient import Updater


def main():
    base, root, work, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    md = os.path.join(work, "metadata")
    os.makedirs(md, exist_ok=True)
    # The first run starts from the root shipped out of band; later ones from the newest root
    # this client followed (python-tuf keeps it in metadata_dir).
    bootstrap = None
    if not os.path.exists(os.path.join(md, "root.json")):
        with open(root, "rb") as f:
            bootstrap = f.read()
    try:
        updater = Updater(
            metadata_dir=md,
            metadata_base_url=base + "/metadata/",
            target_base_url=base + "/",
            target_dir=os.path.join(work, "targets"),
            bootstrap=bootstrap,
        )
        updater.refresh()
        out = {}
        for name in names:
            info = updater.get_targetinfo(name)
            out[name] = None if info is None else {"length": info.length, "sha256": info.hashes["sha256"]}
    except Exception as e:  # the test prints it
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
