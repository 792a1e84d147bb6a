#!/usr/bin/env python3
"""A TUF repository in upgradectl's layout (src/core/tuf.rs), written by the Python reference
implementation (`tuf` from PyPI, installed by tools/install-deps), so the box's verifier is
proven against an implementation that is not its own.

Reads one JSON command per line on stdin, answers one line ("ok" or "error: ...") on stdout;
keys stay in this process's memory. Metadata goes to DIR/metadata/, targets to DIR/<path> and,
as consistent snapshots want, DIR/<dir>/<sha256>.<name>. The tests (tests/tuf.rs) serve DIR at
/v1/ over HTTP. Commands (unknown fields are errors):

  {"op": "init", "root_keys": 1, "root_threshold": 1}
  {"op": "release", "channel": "stable", "version": "2.0", "size": N, "sha256": HEX,
   "signers": ["stable"]}             # signers: key names; default the channel's own key
  {"op": "rollout", "channel": "stable", "doc": {...}}
  {"op": "artifact", "name": "1.0-to-2.0", "data_hex": "..."}
  {"op": "publish", "timestamp_version": null, "expires_seconds": 86400,
   "timestamp_signers": null}         # re-signs snapshot and timestamp
  {"op": "rotate_root", "keys": 3, "threshold": 2, "old_signers": [..], "new_signers": [..],
   "roles": ["root", "timestamp", ...]}  # new keys for these roles; old signers: indices
  {"op": "new_key", "name": "attacker"}
  {"op": "sign_role", "role": "stable", "signers": ["attacker"]}  # re-sign, no version bump
  {"op": "alias_key", "name": "timestamp", "to": "old-timestamp"}  # keep a key for later
  {"op": "point_timestamp", "snapshot_version": 3}
release's "path_channel" signs a target under another channel's path (wrong software).
"""

import hashlib
import json
import os
import sys
from datetime import datetime, timedelta, timezone

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

CHANNELS = ["stable", "candidate", "beta", "edge"]
ONLINE = ["rollout", "artifacts"]
DAY = 86400


def expiry(seconds):
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).replace(microsecond=0)


class Repo:
    def __init__(self, out):
        self.out = out
        self.keys = {}  # name -> [CryptoSigner]
        self.root = None
        self.roles = {}  # "targets" and delegated role names -> Metadata[Targets]
        self.snapshot = None
        self.timestamp = None
        self.dirty = set()

    # -- keys --
    def new_keys(self, name, n=1):
        self.keys[name] = [CryptoSigner.generate_ed25519() for _ in range(n)]
        return self.keys[name]

    def signers(self, names):
        out = []
        for n in names:
            name, _, idx = n.partition("#")
            ks = self.keys[name]
            out.extend([ks[int(idx)]] if idx else ks)
        return out

    # -- writing --
    def write(self, path, data):
        full = os.path.join(self.out, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full + ".tmp", "wb") as f:
            f.write(data)
        os.replace(full + ".tmp", full)

    def write_md(self, name, md):
        self.write(os.path.join("metadata", name), md.to_bytes(JSONSerializer(compact=False)))

    def sign(self, md, names):
        md.signatures.clear()
        for s in self.signers(names):
            md.sign(s, append=True)

    def write_target(self, path, data):
        self.write(path, data)
        d, base = os.path.split(path)
        self.write(os.path.join(d, hashlib.sha256(data).hexdigest() + "." + base), data)

    # -- commands --
    def op_init(self, root_keys=1, root_threshold=1):
        root = Root(expires=expiry(365 * DAY))
        for role, n in [("root", root_keys), ("targets", 1), ("snapshot", 1), ("timestamp", 1)]:
            for s in self.new_keys(role, n):
                root.add_key(s.public_key, role)
        root.roles["root"].threshold = root_threshold
        self.root = Metadata(root)
        self.sign(self.root, ["root"])
        self.write_md("1.root.json", self.root)
        self.write_md("root.json", self.root)
        targets = Targets(expires=expiry(90 * DAY))
        keys, roles = {}, {}
        for name in CHANNELS + ONLINE:
            (s,) = self.new_keys(name)
            keys[s.public_key.keyid] = s.public_key
            paths = [f"releases/{name}/*"] if name in CHANNELS else [f"{name}/*"]
            roles[name] = DelegatedRole(name, [s.public_key.keyid], 1, True, paths)
        targets.delegations = Delegations(keys, roles)
        self.roles["targets"] = Metadata(targets)
        for name in CHANNELS + ONLINE:
            self.roles[name] = Metadata(Targets(expires=expiry(90 * DAY)))
        self.dirty = set(self.roles)
        self.op_publish()

    def bump(self, role):
        if role not in self.dirty:
            self.roles[role].signed.version += 1
            self.dirty.add(role)

    def op_release(self, channel, version, size, sha256, signers=None, path_channel=None):
        self.bump(channel)
        path = f"releases/{path_channel or channel}/{version}.img"
        self.roles[channel].signed.targets[path] = TargetFile(size, {"sha256": sha256}, path)
        self.op_publish(signed={channel: signers} if signers else None)

    def add_data_target(self, role, path, data):
        self.bump(role)
        self.write_target(path, data)
        self.roles[role].signed.targets[path] = TargetFile.from_data(path, data, ["sha256"])

    def op_rollout(self, channel, doc):
        self.add_data_target("rollout", f"rollout/{channel}.json", json.dumps(doc).encode())
        self.op_publish()

    def op_artifact(self, name, data_hex):
        self.add_data_target("artifacts", f"artifacts/{name}", bytes.fromhex(data_hex))
        self.op_publish()

    def op_new_key(self, name):
        self.new_keys(name)

    def op_alias_key(self, name, to):
        self.keys[to] = list(self.keys[name])

    def op_point_timestamp(self, snapshot_version):
        """A fresh timestamp (next version, signed by the timestamp key) naming an older
        snapshot: what a thief of the online key would serve to roll a box back."""
        ts = self.timestamp
        ts.signed.version += 1
        ts.signed.snapshot_meta = MetaFile(version=snapshot_version)
        self.sign(ts, ["timestamp"])
        self.write_md("timestamp.json", ts)

    def op_sign_role(self, role, signers):
        md = self.roles[role]
        self.sign(md, signers)
        self.write_md(f"{md.signed.version}.{role}.json", md)

    def op_publish(self, timestamp_version=None, expires_seconds=DAY, timestamp_signers=None,
                   signed=None):
        signed = signed or {}
        for role in sorted(self.dirty):
            md = self.roles[role]
            self.sign(md, signed.get(role) or [role])
            self.write_md(f"{md.signed.version}.{role}.json", md)
        self.dirty.clear()
        meta = {f"{r}.json": MetaFile(version=md.signed.version) for r, md in self.roles.items()}
        if self.snapshot is None:
            self.snapshot = Metadata(Snapshot(expires=expiry(expires_seconds), meta=meta))
        else:
            self.snapshot.signed.version += 1
            self.snapshot.signed.meta = meta
            self.snapshot.signed.expires = expiry(expires_seconds)
        self.sign(self.snapshot, ["snapshot"])
        self.write_md(f"{self.snapshot.signed.version}.snapshot.json", self.snapshot)
        snap = MetaFile(version=self.snapshot.signed.version)
        if self.timestamp is None:
            self.timestamp = Metadata(Timestamp(expires=expiry(expires_seconds), snapshot_meta=snap))
        else:
            self.timestamp.signed.version += 1
            self.timestamp.signed.snapshot_meta = snap
        if timestamp_version is not None:
            self.timestamp.signed.version = timestamp_version
        self.timestamp.signed.expires = expiry(expires_seconds)
        self.sign(self.timestamp, timestamp_signers or ["timestamp"])
        self.write_md("timestamp.json", self.timestamp)

    def op_rotate_root(self, keys=1, threshold=1, old_signers=None, new_signers=None,
                       roles=("root",), intermediate=False):
        """A new root version with new keys for `roles`, signed by the old root keys named in
        old_signers (indices, default all) and the new ones in new_signers (default all)."""
        old = self.keys["root"]
        signed = self.root.signed
        signed.version += 1
        for role in roles:
            for keyid in list(signed.roles[role].keyids):
                signed.revoke_key(keyid, role)
            for s in self.new_keys(role, keys if role == "root" else 1):
                signed.add_key(s.public_key, role)
        signed.roles["root"].threshold = threshold
        self.root.signatures.clear()
        for i in old_signers if old_signers is not None else range(len(old)):
            self.root.sign(old[i], append=True)
        new = self.keys["root"]
        for i in new_signers if new_signers is not None else range(len(new)):
            if new[i] not in old:
                self.root.sign(new[i], append=True)
        self.write_md(f"{signed.version}.root.json", self.root)
        self.write_md("root.json", self.root)
        if "targets" in roles:
            self.dirty.add("targets")
            self.roles["targets"].signed.version += 1
        self.op_publish()


def main():
    repo = Repo(sys.argv[1])
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            getattr(repo, "op_" + op)(**cmd)
            print("ok", flush=True)
        except Exception as e:  # reported to the test, which fails on it
            print(f"error: {op}: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
