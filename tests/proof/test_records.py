"""Build records: deterministic statements, DSSE signatures, challenge."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from reprobuild.cli import main
from reprobuild.errors import VerifyError
from reprobuild.proof import records, signing
from reprobuild.proof.records import Dependency
from tests.conftest import REPO


def _record(content: str = "c0ffee", drv: str = "drv1", target: str = "root") -> bytes:
    rec = records.make_record(
        derivation_id=drv, target=target, content_hash=content, epoch=1700000000,
        dependencies=[Dependency("busybox", (("sha256", "ab" * 32),)),
                      Dependency("rootfs", (("blake3", "cd" * 32),), derivation="drv0")])
    return records.record_bytes(rec)


def test_statement_shape_and_determinism(tmp_path: Path) -> None:
    out = tmp_path / "image"
    out.write_bytes(b"x" * 5000)
    rec = records.make_record(derivation_id="d" * 64, target="img", content_hash="e" * 64,
                              output_path=out, epoch=1700000000,
                              dependencies=[Dependency("b", (("blake3", "1" * 64),), "f" * 64),
                                            Dependency("a", (("sha256", "2" * 64),))])
    data = records.record_bytes(rec)
    doc = json.loads(data)
    assert doc["_type"] == "https://in-toto.io/Statement/v1"
    assert doc["predicateType"] == "https://slsa.dev/provenance/v1"
    digest = doc["subject"][0]["digest"]
    assert digest["blake3"] == "e" * 64
    assert digest["sha256"] == __import__("hashlib").sha256(b"x" * 5000).hexdigest()
    assert len(digest["fsverity-sha256"]) == 64
    definition = doc["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["derivation"] == "d" * 64
    assert [d["name"] for d in definition["resolvedDependencies"]] == ["a", "b"]
    assert definition["resolvedDependencies"][1]["uri"].endswith("f" * 64)
    assert doc["predicate"]["runDetails"]["builder"]["version"]["reprobuild"]
    # Sorted keys, no whitespace variation: the same record is the same bytes.
    assert data == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    assert records.parse_statement(data) == rec


def test_fsverity_digest_matches_tool(tmp_path: Path) -> None:
    import shutil
    if shutil.which("fsverity") is None:
        pytest.skip("fsverity not installed")
    for size in (0, 1, 4096, 4097, 300_000):
        path = tmp_path / f"f{size}"
        path.write_bytes(os.urandom(size))
        tool = subprocess.run(["fsverity", "digest", str(path)], capture_output=True,
                              text=True, check=True).stdout.split()[0]
        assert tool == "sha256:" + records.file_digests(path)[1]


def test_sign_and_verify(tmp_path: Path) -> None:
    key_path = tmp_path / "key"
    private, public = signing.generate_key(key_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = signing.load_private_key(private)
    payload = _record()
    envelope_bytes = signing.sign_payload(payload, key)
    envelope = signing.parse_envelope(envelope_bytes)
    assert envelope.payload == payload
    pub = signing.load_public_key(public)
    keys = {signing.key_id(pub): pub}
    assert signing.verify_envelope(envelope, keys) == signing.key_id(pub)
    # keyid is sha256 of the raw public key
    assert json.loads(envelope_bytes)["signatures"][0]["keyid"] == signing.key_id(pub)

    # Tampered payload: refused.
    doc = json.loads(envelope_bytes)
    tampered = payload.replace(b"c0ffee", b"c0ffef")
    doc["payload"] = base64.b64encode(tampered).decode()
    bad = tmp_path / "bad.dsse"
    bad.write_text(json.dumps(doc))
    with pytest.raises(VerifyError, match="does not verify"):
        signing.load_record(bad, keys)

    # Wrong key: refused.
    other = signing.generate_key(tmp_path / "other")[1]
    other_pub = signing.load_public_key(other)
    good = tmp_path / "good.dsse"
    good.write_bytes(envelope_bytes)
    with pytest.raises(VerifyError):
        signing.load_record(good, {signing.key_id(other_pub): other_pub})
    assert signing.load_record(good, keys).record.content_hash == "c0ffee"

    # Unsigned record with keys required: refused.
    plain = tmp_path / "plain.json"
    plain.write_bytes(payload)
    with pytest.raises(VerifyError, match="not signed"):
        signing.load_record(plain, keys)


def test_pae_matches_dsse_spec() -> None:
    assert signing.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")


def _cli(*args: str) -> int:
    return main([*args])


def test_sign_command_and_challenge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_dir = tmp_path / "trusted"
    keys_dir.mkdir()
    assert _cli("sign", "--generate-key", str(keys_dir / "alice")) == 0
    assert _cli("sign", "--generate-key", str(keys_dir / "bob")) == 0
    assert _cli("sign", "--generate-key", str(tmp_path / "mallory")) == 0
    os.rename(keys_dir / "alice", tmp_path / "alice")
    os.rename(keys_dir / "bob", tmp_path / "bob")

    def signed(name: str, key: str, content: str, drv: str = "drv1") -> str:
        path = tmp_path / f"{name}.json"
        path.write_bytes(_record(content, drv))
        assert _cli("sign", "--key", str(tmp_path / key), str(path)) == 0
        return str(path) + ".dsse"

    a1 = signed("a1", "alice", "aaaa")
    b1 = signed("b1", "bob", "aaaa")
    a2 = signed("a2", "alice", "bbbb", "drv2")
    b2 = signed("b2", "bob", "cccc", "drv2")
    capsys.readouterr()

    assert _cli("challenge", "--trusted-keys", str(keys_dir), a1, b1) == 0
    out = capsys.readouterr().out
    assert "agree" in out and "DIFFER" not in out
    assert _cli("challenge", "--trusted-keys", str(keys_dir), a1, b1, a2, b2, "--json") == 1
    doc = json.loads(capsys.readouterr().out)
    by_drv = {d["derivation"]: d for d in doc}
    assert by_drv["drv1"]["agree"] and not by_drv["drv2"]["agree"]
    groups = by_drv["drv2"]["outputs"]
    assert sorted(g["digest"]["blake3"] for g in groups) == ["bbbb", "cccc"]
    alice = signing.key_id(signing.load_public_key(keys_dir / "alice.pub"))
    bob = signing.key_id(signing.load_public_key(keys_dir / "bob.pub"))
    assert by_drv["drv1"]["outputs"][0]["builders"] == sorted([alice, bob])

    # Unsigned records compare too, named by file; a differing one exits 1.
    p1, p2 = tmp_path / "p1.json", tmp_path / "p2.json"
    p1.write_bytes(_record("x"))
    p2.write_bytes(_record("y"))
    assert _cli("challenge", str(p1), str(p2)) == 1
    out = capsys.readouterr().out
    assert "DIFFER" in out and str(p1) in out and str(p2) in out

    # sign --verify: OK with the right key, exit 1 and a clear error otherwise.
    assert _cli("sign", "--verify", "--key", str(keys_dir / "alice.pub"), a1) == 0
    assert "OK" in capsys.readouterr().out
    assert _cli("sign", "--verify", "--key", str(keys_dir / "bob.pub"), a1) == 1
    assert "does not verify" in capsys.readouterr().err

    # A record signed by an untrusted key is refused.
    m = signed("m", "mallory", "aaaa")
    assert _cli("challenge", "--trusted-keys", str(keys_dir), a1, m) == 1
    assert "does not verify" in capsys.readouterr().err


def test_cli_module_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "reprobuild", "challenge", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "RECORD" in result.stdout


def test_store_writes_a_record_per_output(tmp_path: Path) -> None:
    from reprobuild.store.store import Store

    store = Store(str(tmp_path / "store"))
    src = tmp_path / "build"
    src.mkdir()
    (src / "image").write_bytes(b"\x00" * 5000)
    inp = store.register("a" * 64, str(src / "image"), derivation={
        "name": "img", "kind": "image", "attrs": {"epoch": 1700000000}}, inputs={},
        epoch=1700000000, record=records.entry_record)
    (src / "dir").mkdir()
    (src / "dir" / "f").write_text("x")
    out = store.register("b" * 64, str(src / "dir"), derivation={
        "name": "rootfs", "kind": "step", "attrs": {"epoch": 1700000000}},
        inputs={"img": {"derivation": "a" * 64, "hash": inp.hash}}, epoch=1700000000,
        record=records.entry_record)
    img_record = records.parse_statement(Path(store.record_path("a" * 64)).read_bytes())
    digest = dict(img_record.output_digest)
    assert digest["blake3"] == inp.hash
    assert digest["fsverity-sha256"] == inp.fsverity
    assert digest["sha256"] == __import__("hashlib").sha256(b"\x00" * 5000).hexdigest()
    dir_record = records.parse_statement(Path(store.record_path("b" * 64)).read_bytes())
    assert dir_record.derivation_id == "b" * 64 and dir_record.target == "rootfs"
    assert dict(dir_record.output_digest) == {"blake3": out.hash}
    assert dir_record.dependencies == (
        Dependency("img", (("blake3", inp.hash),), "a" * 64),)
    assert dir_record.epoch == 1700000000
    # Two stores, same build: byte-identical records (no wall clock, no host path).
    other = Store(str(tmp_path / "other"))
    (src / "dir2").mkdir()
    (src / "dir2" / "f").write_text("x")
    other.register("b" * 64, str(src / "dir2"), derivation={
        "name": "rootfs", "kind": "step", "attrs": {"epoch": 1700000000}},
        inputs={"img": {"derivation": "a" * 64, "hash": inp.hash}}, epoch=1700000000,
        record=records.entry_record)
    assert Path(other.record_path("b" * 64)).read_bytes() == \
        Path(store.record_path("b" * 64)).read_bytes()


def test_records_of_independent_builds_challenge(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Two stores build the same recipe (engine tests' fake runner): the honest step's
    records agree, the clock step's differ, and challenge says which."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('epoch = 1700000000\n[sources.sh]\nhost = "/bin/sh"\n'
                      '[steps.honest]\ninputs = ["sh"]\n'
                      'builder = ["sh", "-c", "echo same > $out"]\n'
                      '[steps.clock]\ninputs = ["sh"]\n'
                      'builder = ["sh", "-c", "date +%s%N > $out"]\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    signed: dict[str, list[str]] = {"honest": [], "clock": []}
    for builder in ("alice", "bob"):
        out = subprocess.run(
            [sys.executable, "-m", "tests.build.fakecli", "build", "--json", "--no-out-link",
             "--store", str(tmp_path / builder), str(recipe)],
            env=env, capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        key = tmp_path / f"{builder}.key"
        signing.generate_key(key)
        for row in json.loads(out.stdout):
            assert main(["sign", "--key", str(key), row["record"]]) == 0
            signed[row["target"]].append(row["record"] + ".dsse")
    capsys.readouterr()
    keys = ["--key", str(tmp_path / "alice.key.pub"), "--key", str(tmp_path / "bob.key.pub")]
    assert main(["challenge", *keys, *signed["honest"]]) == 0
    assert "1 outputs, 1 identical, 0 differing" in capsys.readouterr().out
    assert main(["challenge", *keys, "--json", *signed["honest"], *signed["clock"]]) == 1
    verdict = {d["target"]: d for d in json.loads(capsys.readouterr().out)}
    assert verdict["honest"]["agree"] and not verdict["clock"]["agree"]
    assert len(verdict["clock"]["outputs"]) == 2
    alice = signing.key_id(signing.load_public_key(tmp_path / "alice.key.pub"))
    assert [alice] in [o["builders"] for o in verdict["clock"]["outputs"]]
