"""The fleet against a real S3 server (SeaweedFS on loopback): objects and pointers, refusals of
damaged and foreign objects, write-behind through a dead and restarted store and a restarted
uploader, and two real clawd boxes: a prefix computed on one is hydrated on the other."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from clawctl.config import FleetCredentials, FleetSection
from clawctl.errors import IntegrityError, NotFound
from clawctl.fleet.bucket import Bucket, FleetObjectMissing
from clawctl.fleet.store import FleetStore, file_sha256
from clawctl.fleet.uploader import FleetUploader
from clawctl.paths import Paths
from clawctl.schemas.state import StateIdentity
from clawctl.store.snapshot_format import SnapshotMismatch, encode, write_snapshot
from clawctl.store.snapshots import SnapshotStore, block_hashes
from tests.conftest import Daemon, copy_home, run_cli, run_daemon, wait_for
from tests.seaweed import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedS3, StallingProxy, seaweed
from tests.test_snapshots_api import DOC, chat

BLOCK = 16
IDENTITY = StateIdentity(
    model_sha256="b" * 64, state_format="llama-cpp-python/x/session-v10", n_ctx=4096,
    type_k="f16", type_v="f16", flash_attn=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with seaweed(tmp_path_factory.mktemp("s3")) as server:
        yield server


def _fleet(
    s3: SeaweedS3, home: Path, prefix: str, box: str, endpoint: str | None = None
) -> FleetStore:
    endpoint = endpoint or s3.endpoint
    section = FleetSection(endpoint=endpoint, bucket=BUCKET, prefix=prefix,
                           index_refresh_seconds=0)  # fmt: skip
    bucket = Bucket(endpoint, BUCKET, "us-east-1", FleetCredentials(ACCESS_KEY, SECRET_KEY))
    return FleetStore(bucket, section, box, SnapshotStore(Paths.build(home), 1 << 30, BLOCK))


def _pool_file(store: SnapshotStore, tokens: list[int], seed: int = 0, size: int = 200_000) -> Path:
    """A pool entry as the snapshot writer leaves one (random bytes stand in for the state)."""
    chains = block_hashes(IDENTITY, tokens, BLOCK)
    path = store.pool_path(IDENTITY, chains[-1])
    header, chunks = encode(
        os.urandom(size + seed), kind="pool", name=chains[-1], identity=IDENTITY, tokens=tokens
    )
    write_snapshot(path, header, chunks)
    store.pool_added(IDENTITY, path, tokens)
    return path


def test_a_pool_entry_travels_between_stores_and_damaged_or_foreign_ones_are_refused(
    s3: SeaweedS3, tmp_path: Path
) -> None:
    a = _fleet(s3, tmp_path / "a", "objects-test", "box-a")
    b = _fleet(s3, tmp_path / "b", "objects-test", "box-b")
    tokens = list(range(100))
    source = _pool_file(a.snapshots, tokens)
    assert a.push("pool", source) is True
    assert a.push("pool", source) is False  # the same bytes again: the conditional write refuses

    prompt = block_hashes(IDENTITY, [*tokens[:64], 999, 998], BLOCK)  # shares 4 of 6 blocks
    hit = b.pool_lookup(IDENTITY, prompt)
    assert hit is not None
    assert hit.tokens == 4 * BLOCK
    assert hit.pointer.box == "box-a"
    fetched = b.fetch_pool(hit.pointer, IDENTITY)
    assert file_sha256(fetched) == file_sha256(source)
    local = b.snapshots.pool_lookup(IDENTITY, prompt)
    assert local is not None
    assert local.path == fetched
    key = a.object_key(hit.pointer.sha256)
    head = s3.client().head_object(Bucket=BUCKET, Key=key)
    assert head["Metadata"]["identity"] == IDENTITY.key()
    assert head["Metadata"]["tokens"] == "100"

    # A different identity: the pointer is filed under this context's key, the object is not
    # for this context; refused as a local snapshot of another model would be.
    other = IDENTITY.model_copy(update={"n_ctx": 8192})
    c = _fleet(s3, tmp_path / "c", "objects-test", "box-c")
    with pytest.raises(SnapshotMismatch, match="n_ctx"):
        c.fetch_pool(hit.pointer, other)
    assert not list(c.snapshots.dir_for("pool").rglob("*.snap"))

    # Damaged in the store: the bytes no longer have the sha256 they are filed under.
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=b"CLAWSNAP" + os.urandom(5000))
    with pytest.raises(IntegrityError, match="sha256"):
        c.fetch_pool(hit.pointer, IDENTITY)
    assert not [p for p in c.snapshots.dir_for("pool").rglob("*") if p.is_file()]  # no temp file
    assert c.status().fetch_refused == 2


def test_uploads_wait_out_a_dead_store_and_survive_a_restart(tmp_path: Path, s3: SeaweedS3) -> None:
    fleet = _fleet(s3, tmp_path / "a", "outbox-test", "box-a")
    outbox = tmp_path / "outbox"
    path = _pool_file(fleet.snapshots, list(range(50)), seed=1)
    s3.kill()
    try:
        uploader = FleetUploader(fleet, outbox, capacity=4)
        assert uploader.submit("pool", path)
        wait_for("a failed upload attempt", lambda: uploader.errors >= 1)
        assert uploader.queued == 1
        uploader.stop()  # clawd stops while the store is still down
        assert len(list(outbox.glob("*.json"))) == 1
    finally:
        s3.start()
    again = FleetUploader(fleet, outbox, capacity=4)  # the next start takes up the outbox
    try:
        wait_for("the upload", lambda: again.queued == 0)
    finally:
        again.stop()
    assert not list(outbox.glob("*.json"))
    assert s3.keys(fleet.object_key(file_sha256(path))) == [fleet.object_key(file_sha256(path))]
    chain = path.stem
    assert s3.keys(fleet.pool_key(IDENTITY.key(), chain))


def test_a_full_upload_queue_leaves_snapshots_local(tmp_path: Path, s3: SeaweedS3) -> None:
    fleet = _fleet(s3, tmp_path / "a", "full-test", "box-a")
    s3.kill()
    try:
        uploader = FleetUploader(fleet, tmp_path / "outbox", capacity=1)
        try:
            paths = [_pool_file(fleet.snapshots, list(range(i, 48 + i)), seed=i) for i in range(3)]
            assert [uploader.submit("pool", p) for p in paths] == [True, False, False]
            assert uploader.skipped == 2
        finally:
            uploader.stop()
    finally:
        s3.start()


def _box(home: Path, directory: Path, s3: SeaweedS3, prefix: str, **fleet: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "clawd.toml"
    config.write_text(
        "[snapshots]\npool = true\npool_min_tokens = 256\nblock_tokens = 128\n\n"
        + s3.config_section(directory, prefix, **fleet)
    )
    return config


def _status(daemon: Daemon) -> dict:  # type: ignore[type-arg]
    with daemon.client() as client:
        response = client.get("/admin/fleet")
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_prefix_computed_on_one_box_is_hydrated_on_another(
    fresh_home: Path, short_dir: Path, tmp_path: Path, s3: SeaweedS3
) -> None:
    home_b = copy_home(fresh_home, tmp_path / "home-b")
    config_a = _box(fresh_home, tmp_path / "a", s3, "two-boxes")
    config_b = _box(home_b, tmp_path / "b", s3, "two-boxes")
    system = [{"role": "system", "content": DOC}]
    with run_daemon(fresh_home, short_dir / "a.sock", tmp_path, CLAW_CONFIG=str(config_a)) as a:
        cold = chat(a, [*system, {"role": "user", "content": "What is clawd?"}])
        assert cold["claw"]["prefill_tokens_saved"] == 0
        wait_for("box A's upload", lambda: (s := _status(a))["uploaded"] >= 1 and not s["queued"])
        run_cli("snapshot", "save", "readme", "--prompt", DOC, env=_cli_env(a))
        pushed = run_cli("fleet", "push", "readme", "--json", env=_cli_env(a))
        assert pushed.returncode == 0, pushed.stderr
        wait_for("the named upload", lambda: "readme" in _status(a)["named"])
    with run_daemon(home_b, short_dir / "b.sock", tmp_path, CLAW_CONFIG=str(config_b)) as b:
        warm = chat(b, [*system, {"role": "user", "content": "How do I run the tests?"}])
        assert warm["claw"]["prefix_source"] == "fleet"
        saved = warm["claw"]["prefill_tokens_saved"]
        assert saved >= 512
        assert warm["usage"]["prompt_tokens"] - saved < 128 + 40  # the question, a part block
        status = _status(b)
        assert status["fetched"] == 1
        assert status["fetch_refused"] == 0
        # B now holds the entry locally: the next request hydrates from its own pool.
        b.stop()
    with run_daemon(home_b, short_dir / "b.sock", tmp_path, CLAW_CONFIG=str(config_b)) as b:
        again = chat(b, [*system, {"role": "user", "content": "And clawctl?"}])
        assert again["claw"]["prefix_source"] == "pool"
        env = _cli_env(b)
        synced = run_cli("fleet", "sync", "--json", env=env)
        assert synced.returncode == 0, synced.stderr
        assert json.loads(synced.stdout)["pulled"] == ["readme"]
        listed = run_cli("snapshot", "list", "--json", env=env)
        assert '"readme"' in listed.stdout
        missing = run_cli("fleet", "pull", "nosuch", env=env)
        assert missing.returncode == 2
        assert "no snapshot named 'nosuch'" in missing.stderr
        clash = run_cli("fleet", "pull", "readme", env=env)  # never replaces a local snapshot
        assert clash.returncode == 2
        assert "already exists" in clash.stderr


def _cli_env(daemon: Daemon) -> dict[str, str]:
    return dict(os.environ, CLAW_SOCKET=str(daemon.socket), CLAW_HOME=str(daemon.home))


def test_without_a_fleet_the_commands_say_how_to_turn_it_on(daemon: Daemon) -> None:
    env = _cli_env(daemon)
    status = run_cli("fleet", "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert '"enabled": false' in status.stdout
    pull = run_cli("fleet", "pull", "x", env=env)
    assert pull.returncode == 2
    assert "[fleet] endpoint" in pull.stderr


def test_a_missing_named_snapshot_is_not_found(s3: SeaweedS3, tmp_path: Path) -> None:
    fleet = _fleet(s3, tmp_path / "a", "named-test", "box-a")
    with pytest.raises(NotFound):
        fleet.pull_named("nothing-here")


def test_a_prefix_is_fetched_only_when_that_beats_computing_it(
    s3: SeaweedS3, tmp_path: Path
) -> None:
    fleet = _fleet(s3, tmp_path / "a", "weigh-test", "box-a")
    fleet.section = FleetSection(assumed_bandwidth_mb_s=1.0, assumed_prefill_tokens_s=100.0)
    assert fleet.worth_fetching(1 << 20, 200)  # 1 s to fetch, 2 s to compute
    assert not fleet.worth_fetching(1 << 20, 50)  # 1 s to fetch, 0.5 s to compute
    assert not fleet.worth_fetching(1 << 20, 200, prefill_rate=1000.0)  # measured: 0.2 s here
    fleet.section = FleetSection(assumed_bandwidth_mb_s=0.001, assumed_prefill_tokens_s=100.0)
    assert not fleet.worth_fetching(1 << 20, 200)  # ~17 min to fetch at the assumed 1 kB/s
    source = _pool_file(fleet.snapshots, list(range(200, 300)), seed=3)
    fleet.push("pool", source)
    hit = fleet.pool_lookup(IDENTITY, block_hashes(IDENTITY, list(range(200, 300)), BLOCK))
    assert hit is not None
    fleet.fetch_pool(hit.pointer, IDENTITY)  # a measured fetch replaces the assumption
    measured = fleet.status().bandwidth_mb_s
    assert measured is not None
    assert measured > 0.1  # loopback
    assert fleet.worth_fetching(1 << 20, 200)


def test_a_session_frozen_on_one_box_continues_on_another(
    fresh_home: Path, short_dir: Path, tmp_path: Path, s3: SeaweedS3
) -> None:
    home_b = copy_home(fresh_home, tmp_path / "home-b")
    config_a = _box(fresh_home, tmp_path / "a", s3, "sessions", sessions=True)
    config_b = _box(home_b, tmp_path / "b", s3, "sessions", sessions=True)
    turn = [{"role": "system", "content": DOC}, {"role": "user", "content": "What is clawd?"}]
    with run_daemon(fresh_home, short_dir / "a.sock", tmp_path, CLAW_CONFIG=str(config_a)) as a:
        first = chat(a, turn, session="agent-7")
        wait_for(
            "the session's upload", lambda: (s := _status(a))["uploaded"] >= 2 and not s["queued"]
        )
    turn2 = [
        *turn,
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And clawctl?"},
    ]
    with run_daemon(home_b, short_dir / "b.sock", tmp_path, CLAW_CONFIG=str(config_b)) as b:
        second = chat(b, turn2, session="agent-7")
        assert second["claw"]["prefix_source"] == "session"
        assert second["claw"]["prefill_tokens_saved"] > 700
        assert _status(b)["fetched"] == 1


def _named_file(store: SnapshotStore, name: str) -> Path:
    path = store.path_for("named", name)
    header, chunks = encode(
        os.urandom(50_000), kind="named", name=name, identity=IDENTITY, tokens=list(range(20))
    )
    write_snapshot(path, header, chunks)
    return path


def test_gc_removes_what_no_box_used_lately_and_keeps_named_snapshots(
    s3: SeaweedS3, tmp_path: Path
) -> None:
    fleet = _fleet(s3, tmp_path / "a", "gc-test", "box-a")
    old = _pool_file(fleet.snapshots, list(range(500, 564)), seed=5)
    fleet.push("pool", old)
    fleet.push("named", _named_file(fleet.snapshots, "manual"))
    objects = fleet._key("objects") + "/"
    assert len(s3.keys(objects)) == 2
    recent = fleet.gc(older_than=3600)
    assert (recent.objects, recent.kept) == (0, 2)  # both used a moment ago
    dry = fleet.gc(older_than=0, dry_run=True)
    assert (dry.objects, dry.pointers, dry.kept, dry.dry_run) == (1, 1, 1, True)
    assert len(s3.keys(objects)) == 2  # a dry run removes nothing
    done = fleet.gc(older_than=0)
    assert (done.objects, done.pointers, done.kept) == (1, 1, 1)
    assert done.bytes == old.stat().st_size
    assert s3.keys(objects) == [
        fleet.object_key(file_sha256(fleet.snapshots.path_for("named", "manual")))
    ]
    assert not s3.keys(fleet._key("pool") + "/")
    assert fleet.named() == ["manual"]
    # What gc removed is simply not found any more: the prefix is computed again.
    hashes = block_hashes(IDENTITY, list(range(500, 564)), BLOCK)
    assert fleet.pool_lookup(IDENTITY, hashes) is None
    # A box that indexed the entry before gc finds it gone once, and stops offering it.
    other = _fleet(s3, tmp_path / "b", "gc-test", "box-b")
    again = _pool_file(other.snapshots, list(range(600, 664)), seed=6)
    other.push("pool", again)
    seen = other.pool_lookup(IDENTITY, block_hashes(IDENTITY, list(range(600, 664)), BLOCK))
    assert seen is not None
    fleet.gc(older_than=0)
    with pytest.raises(FleetObjectMissing):
        other.fetch_pool(seen.pointer, IDENTITY)
    other.section = other.section.model_copy(update={"index_refresh_seconds": 3600.0})
    assert other.pool_lookup(IDENTITY, block_hashes(IDENTITY, list(range(600, 664)), BLOCK)) is None


def _pull(daemon: Daemon, name: str) -> dict:  # type: ignore[type-arg]
    """`POST /admin/models/pull` to its end: the NDJSON result line's PullResult."""
    with daemon.client() as client:
        response = client.post("/admin/models/pull", json={"ref": name})
    assert response.status_code == 200, response.text
    last = json.loads(response.text.strip().splitlines()[-1])
    assert last["type"] == "result", last
    return dict(last["result"])


def test_a_model_one_box_pulled_comes_from_the_fleet_on_the_next(
    short_dir: Path, tmp_path: Path, s3: SeaweedS3
) -> None:
    home_a, home_b = tmp_path / "home-a", tmp_path / "home-b"
    config_a = _box(home_a, tmp_path / "a", s3, "models")
    config_b = _box(home_b, tmp_path / "b", s3, "models")
    with run_daemon(home_a, short_dir / "a.sock", tmp_path, CLAW_CONFIG=str(config_a)) as a:
        first = _pull(a, "smollm2-135m")
        assert first["fetched"] is True
        assert first["from_fleet"] is False  # the fleet had no copy yet: from its source
        wait_for(
            "the model's upload", lambda: (s := _status(a))["uploaded"] >= 1 and not s["queued"]
        )
    digest = first["manifest"]["digest"]
    assert s3.keys(f"models/objects/{digest}") == [f"models/objects/{digest}"]
    empty_cache = tmp_path / "no-downloads"  # B has nothing cached: only the fleet is near
    with run_daemon(
        home_b, short_dir / "b.sock", tmp_path, CLAW_CONFIG=str(config_b),
        CLAW_DOWNLOAD_CACHE=str(empty_cache),
    ) as b:  # fmt: skip
        second = _pull(b, "smollm2-135m")
        assert second["fetched"] is True
        assert second["from_fleet"] is True
        assert second["manifest"]["digest"] == digest
        chat_body = {"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 2}
        with b.client() as client:
            assert client.post("/v1/completions", json=chat_body).status_code == 200
    assert not list(empty_cache.rglob("*.whl"))


def _install(daemon: Daemon, url: str, sha256: str) -> list[dict]:  # type: ignore[type-arg]
    body = {"url": url, "base": "smollm2-135m", "name": "shared", "sha256": sha256}
    with daemon.client() as client:
        response = client.post("/admin/adapters/install", json=body)
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.strip().splitlines()]


def test_an_adapter_one_box_installed_comes_from_the_fleet_when_its_url_is_gone(
    fresh_home: Path, short_dir: Path, tmp_path: Path, s3: SeaweedS3, smollm2_gguf: Path
) -> None:
    import functools
    import http.server
    import threading

    from tests.test_adapters import make_lora

    served = tmp_path / "served"
    served.mkdir()
    lora = make_lora(smollm2_gguf, served / "shared.gguf", b_scale=0.5, seed=3)
    digest = file_sha256(lora)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/shared.gguf"
    home_b = copy_home(fresh_home, tmp_path / "home-b")
    config_a = _box(fresh_home, tmp_path / "a", s3, "adapters")
    config_b = _box(home_b, tmp_path / "b", s3, "adapters")
    try:
        with run_daemon(fresh_home, short_dir / "a.sock", tmp_path, CLAW_CONFIG=str(config_a)) as a:
            assert _install(a, url, digest)[-1]["type"] == "result"
            wait_for(
                "the adapter's upload",
                lambda: (s := _status(a))["uploaded"] >= 1 and not s["queued"],
            )
    finally:
        server.shutdown()
        server.server_close()  # the URL is gone now
    with run_daemon(home_b, short_dir / "b.sock", tmp_path, CLAW_CONFIG=str(config_b)) as b:
        lines = _install(b, url, digest)
        assert lines[-1]["type"] == "result", lines[-1]
        assert lines[-1]["result"]["digest"] == digest
        assert lines[-1]["result"]["source"] == url  # recorded as installed from its URL


def test_a_store_killed_mid_upload_and_restarted_loses_nothing(
    tmp_path: Path, s3: SeaweedS3
) -> None:
    proxy = StallingProxy(s3.port, after=1 << 20)
    try:
        fleet = _fleet(s3, tmp_path / "a", "mid-upload", "box-a", endpoint=proxy.endpoint)
        path = _pool_file(fleet.snapshots, list(range(700, 764)), size=8 << 20)
        uploader = FleetUploader(fleet, tmp_path / "outbox", capacity=4)
        try:
            proxy.armed.set()
            assert uploader.submit("pool", path)
            wait_for("a megabyte of the upload on its way", proxy.holding.is_set)
            s3.kill()  # SIGKILL with the object half sent
            proxy.armed.clear()  # later attempts go straight through
            proxy.release.set()
            wait_for("the cut-off attempt to fail", lambda: uploader.errors >= 1)
            s3.start()  # same data dir, same ports
            wait_for("the upload after the restart", lambda: uploader.queued == 0)
        finally:
            uploader.stop()
    finally:
        proxy.close()
    key = fleet.object_key(file_sha256(path))
    body = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == file_sha256(path)  # whole, not a torn half
    assert uploader.errors >= 1
