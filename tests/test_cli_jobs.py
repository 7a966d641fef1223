"""`python -m fabric`: the `run` job end to end on an embedded fabric (bad lines fail alone, tokens
equal an in-process engine, a re-run redoes nothing done), `jobs` parsing, `--help` of every
subcommand, and `serve` / `status` / `run --name` / `scale` / `stop` against a real head node."""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest
import ray_head

from fabric import cli, jobs
from fabric.config import load_config
from fabric.result import Result

CONFIG = {"instances": {"count": 2, "kv_blocks": 32, "block_size": 16}}   # 512 tokens each
LONG = [i % 256 for i in range(500)]           # 500 + 100 tokens: more than one instance holds


def fabric_cli(*args: str, env: dict | None = None, timeout: int = 240):
    return subprocess.run([sys.executable, "-m", "fabric", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def write_jsonl(path, lines: list) -> None:
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def read_rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def without_metrics(path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "metrics"} for r in read_rows(path)]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "fabric.yaml"
    path.write_text(json.dumps(CONFIG))          # JSON is YAML
    return str(path)


@pytest.fixture(scope="module")
def reference():
    """Tokens from one in-process `Engine` with the fabric's model: request fields -> ids."""
    from fabric.engine import Engine
    from fabric.model import load_model
    from fabric.sequence import SamplingParams
    from fabric.tokenizer import ByteTokenizer

    m = load_config(CONFIG).model
    model = load_model(m.preset, m.path, m.dtype, m.seed)
    tok = ByteTokenizer(model.args.vocab_size)

    def run(req: dict) -> list[int]:
        prompt = tok.encode(req["prompt"]) if isinstance(req["prompt"], str) else req["prompt"]
        params = SamplingParams(req.get("max_new_tokens", 16), req.get("temperature", 0.0),
                                req.get("seed"), req.get("ignore_eos", False))
        return Engine(model, kv_blocks=64, block_size=16).generate([prompt], params)[0].output
    return run


# ---- jobs: parsing and bookkeeping (no fabric) ------------------------------------------------
def test_parse_good_lines():
    line = jobs.parse_line(b'{"id": "a", "prompt": [1, 2], "max_new_tokens": 3, "seed": null}', 4)
    assert (line.number, line.id, line.error) == (4, "a", None)
    assert line.request == {"prompt": [1, 2], "max_new_tokens": 3, "seed": None}
    line = jobs.parse_line('{"prompt": "hi", "temperature": 1, "ignore_eos": true}', 7)
    assert line.id == "line-7" and line.request["prompt"] == "hi"
    assert jobs.parse_line('{"id": 12, "prompt": [0]}', 1).id == 12


@pytest.mark.parametrize("text,message", [
    ('{"id": "a", "prompt": [1, 2', "malformed JSON"),
    ("[1, 2, 3]", "must be a JSON object, got list"),
    ('"just text"', "must be a JSON object, got str"),
    ('{"id": "a"}', "prompt is missing"),
    ('{"prompt": null}', "prompt is missing"),
    ('{"prompt": [1, "2"]}', "list of integer token ids"),
    ('{"prompt": [1.0]}', "list of integer token ids"),
    ('{"prompt": [true]}', "list of integer token ids"),
    ('{"prompt": {"a": 1}}', "list of integer token ids"),
    ('{"prompt": [1], "max_new_tokens": "8"}', "max_new_tokens must be an integer"),
    ('{"prompt": [1], "max_new_tokens": 2.5}', "max_new_tokens must be an integer"),
    ('{"prompt": [1], "max_new_tokens": true}', "max_new_tokens must be an integer"),
    ('{"prompt": [1], "temperature": "hot"}', "temperature must be a number"),
    ('{"prompt": [1], "seed": 1.5}', "seed must be an integer or null"),
    ('{"prompt": [1], "ignore_eos": "yes"}', "ignore_eos must be true or false"),
    ('{"id": [1], "prompt": [1]}', "id must be a string or an integer"),
    ('{"id": true, "prompt": [1]}', "id must be a string or an integer"),
    ('{"prompt": [1], "top_q": 0.9}', "unknown field 'top_q'"),
    ("[" * 100_000, "nested too deeply"),
])
def test_parse_bad_lines(text, message):
    line = jobs.parse_line(text, 3)
    assert line.request is None and line.error_type == jobs.INVALID_LINE
    assert message in line.error
    row = jobs.output_row(line)
    assert row["line"] == 3 and row["id"] in ("line-3", "a") and message in row["error"]


def test_invalid_utf8_fails_its_line_only(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": [1]}\n{"prompt": "\xff\xfe"}\n\n  \n{"id": 5, "prompt": [2]}\n')
    lines = list(jobs.read_lines(str(path)))
    assert [(ln.number, ln.id) for ln in lines] == [(1, "line-1"), (2, "line-2"), (5, 5)]
    assert "not UTF-8" in lines[1].error and lines[0].request and lines[2].request
    assert jobs.count_lines(str(path)) == 3


def test_pending_lines_skip_done_and_fail_duplicates():
    lines = [jobs.parse_line(json.dumps({"id": i, "prompt": [1]}), n)
             for n, i in enumerate(["a", "b", "a", "c", "b"], start=1)]
    summary = jobs.Summary()
    out = list(jobs.pending_lines(iter(lines), {"b"}, summary))
    assert [(ln.number, ln.id) for ln in out] == [(1, "a"), (3, "a"), (4, "c"), (5, "b")]
    assert summary.skipped == 1
    assert out[1].error == "duplicate id 'a' (first on line 1)" and out[1].request is None
    assert out[3].error == "duplicate id 'b' (first on line 2)"


def test_compact_output_keeps_results_only(tmp_path):
    path = tmp_path / "out.jsonl"
    ok = {"id": "a", "tokens": [1], "text": "", "finish_reason": "length", "metrics": {}}
    path.write_text("\n".join([json.dumps(ok), json.dumps({"id": "b", "line": 2, "error": "x"}),
                               '{"id": "c", "tok', json.dumps({**ok, "id": 7}),
                               json.dumps(ok), "[1]"]))   # torn last write, repeated id
    assert jobs.compact_output(str(path)) == {"a", 7}
    assert [r["id"] for r in read_rows(path)] == ["a", 7]
    assert jobs.compact_output(str(tmp_path / "missing.jsonl")) == set()


def test_output_rows():
    line = jobs.parse_line('{"id": "x", "prompt": [1]}', 9)
    err = Result([], finish_reason="error", error="prompt 3: prompt is empty",
                 error_type="RequestError")
    assert jobs.output_row(line, err) == {"id": "x", "line": 9, "error": "prompt is empty",
                                          "error_type": "RequestError"}
    ok = Result([5, 6], text="ab", metrics={"ttft_s": 0.1})
    assert jobs.output_row(line, ok) == {"id": "x", "tokens": [5, 6], "text": "ab",
                                         "finish_reason": "length", "metrics": {"ttft_s": 0.1}}


def test_progress_bar_and_summary():
    s = jobs.Summary(skipped=1)
    s.add({"id": "a", "tokens": [1, 2, 3]})
    s.add({"id": "b", "line": 2, "error": "x"})
    text = s.format()
    for part in ("lines 3", "ok 1", "errors 1", "skipped 1", "tokens 3", "tokens/s"):
        assert part in text
    tty = io.StringIO()
    bar = jobs.Progress(4, tty, enabled=True)
    bar.update(s, force=True)
    bar.close(s)
    assert tty.getvalue().startswith("\r[") and "3/4 lines" in tty.getvalue()
    assert tty.getvalue().endswith("\n")
    quiet = io.StringIO()                       # not a terminal: no bar
    jobs.Progress(4, quiet).close(s)
    assert quiet.getvalue() == ""


def test_job_of_bad_lines_starts_no_fabric(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, ["{oops", [1], {"id": "t", "prompt": [1], "max_new_tokens": "2"}])

    def no_fabric():
        raise AssertionError("no line needs the fabric")
    summary = jobs.run_job(no_fabric, str(src), str(dst))
    assert (summary.lines, summary.errors) == (3, 3)
    rows = [(r["id"], r["line"]) for r in read_rows(dst)]
    assert rows == [("line-1", 1), ("line-2", 2), ("t", 3)]


# ---- cli without a fabric --------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["demo"], ["run"], ["serve"], ["status"], ["scale"],
                                     ["stop"]])
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_console_script_help():
    script = os.path.join(os.path.dirname(sys.executable), "kv-fabric")
    if not os.path.exists(script):
        pytest.skip("the kv-fabric console script is not installed beside this Python")
    res = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for command in ("demo", "run", "serve", "status", "scale", "stop"):
        assert command in res.stdout


def test_missing_input_file_exits_2(tmp_path):
    res = fabric_cli("run", "--input", str(tmp_path / "nope.jsonl"),
                     "--output", str(tmp_path / "o"))
    assert res.returncode == 2
    assert "input file" in res.stderr and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,message", [
    (["--name", "x", "--config", "c.yaml"], "a named one (--name) has its own config"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--address", "127.0.0.1:1"], "cannot reach Ray at '127.0.0.1:1'"),
])
def test_run_usage_errors_exit_2(tmp_path, capsys, extra, message):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": [1]}])
    assert cli.main(["run", "--input", str(src), "--output", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_bad_config_exits_2(tmp_path, capsys):
    src, cfg = tmp_path / "in.jsonl", tmp_path / "bad.yaml"
    write_jsonl(src, [{"prompt": [1]}])
    cfg.write_text("instances: {kv_blocks: 0}\n")
    assert cli.main(["run", "--input", str(src), "--output", str(tmp_path / "o"),
                     "--config", str(cfg)]) == 2
    assert "instances.kv_blocks" in capsys.readouterr().err


def test_status_table():
    stats = {"instances": [
        {"id": 0, "node": "a1b2c3d4e5f6", "blocks_total": 32, "blocks_free": 20, "blocks_lent": 4,
         "blocks_borrowed": 0, "detail": {"num_running": 2, "num_waiting": 1, "num_generated": 77}},
        {"id": 1, "node": "ffee", "blocks_total": 32, "blocks_free": 30, "blocks_lent": 0,
         "blocks_borrowed": 4, "detail": {}}]}
    rows = cli.status_table(stats, {0: 12.5}).splitlines()
    assert rows[0].split() == list(cli.STATUS_COLUMNS)
    assert rows[1].split() == ["0", "a1b2c3d4", "32", "20", "4", "0", "2", "1", "77", "12.5"]
    assert rows[2].split() == ["1", "ffee", "32", "30", "0", "4", "-", "-", "-", "-"]


# ---- run on an embedded fabric ---------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_env():
    """A private Ray temp dir: `ray.init()` without an address joins the last `ray start`
    cluster of this machine (/tmp/ray/ray_current_cluster) instead of starting an embedded one,
    and other clusters come and go here."""
    temp = tempfile.mkdtemp(prefix="kvr")      # short: Ray's socket paths must stay < 108 bytes
    yield {**os.environ, "RAY_TMPDIR": temp}
    shutil.rmtree(temp, ignore_errors=True)


GOOD = {
    "ids": {"id": "ids", "prompt": [3, 1, 4, 1, 5, 9, 2, 6], "max_new_tokens": 8,
            "ignore_eos": True},
    "text": {"id": "text", "prompt": "Hello, fabric!", "max_new_tokens": 6, "ignore_eos": True},
    "line-9": {"prompt": [2, 7, 1, 8], "max_new_tokens": 5, "temperature": 0.8, "seed": 7,
               "ignore_eos": True},
    "long": {"id": "long", "prompt": LONG, "max_new_tokens": 100, "ignore_eos": True},
}
LINES = [GOOD["ids"], GOOD["text"],
         '{"id": "broken", "prompt": [1, 2',                        # 3: malformed JSON
         [1, 2, 3],                                                 # 4: not an object
         {"id": "empty", "prompt": [], "max_new_tokens": 4},        # 5
         {"id": "oov", "prompt": [1, 99999], "max_new_tokens": 4},  # 6
         {"id": "zero", "prompt": [5, 6], "max_new_tokens": 0},     # 7
         "",                                                        # 8: blank, ignored
         GOOD["line-9"],
         GOOD["long"],                                              # 10: borrows KV blocks
         {"id": "ids", "prompt": [1]},                              # 11: duplicate id
         {"id": "types", "prompt": [1, 2], "max_new_tokens": "8"}]  # 12
ERRORS = {"line-3": (3, "malformed JSON"), "line-4": (4, "must be a JSON object"),
          "empty": (5, "prompt is empty"), "oov": (6, "outside the vocabulary"),
          "zero": (7, "max_new_tokens must be an integer >= 1"),
          "ids": (11, "duplicate id 'ids' (first on line 1)"),
          "types": (12, "max_new_tokens must be an integer")}


def check_rows(rows: list[dict], reference, good: dict, errors: dict) -> None:
    ok = {r["id"]: r for r in rows if "error" not in r}
    bad = {r["id"]: r for r in rows if "error" in r}
    assert sorted(ok) == sorted(good) and sorted(bad) == sorted(errors)
    for rid, req in good.items():
        r = ok[rid]
        assert r["tokens"] == reference(req), f"{rid}: tokens differ from the in-process engine"
        assert r["finish_reason"] == "length"
        assert r["metrics"]["num_output_tokens"] == len(r["tokens"])
        assert set(r) == {"id", "tokens", "text", "finish_reason", "metrics"}
    for rid, (number, message) in errors.items():
        assert bad[rid]["line"] == number and message in bad[rid]["error"], bad[rid]


def test_run_end_to_end_and_resume(tmp_path, config_file, reference, embedded_env):
    src, dst = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    write_jsonl(src, LINES)
    first = fabric_cli("run", "--input", str(src), "--output", str(dst), "--config", config_file,
                       "--batch-size", "3", env=embedded_env)
    assert first.returncode == 1, first.stderr[-3000:]                  # some lines failed
    assert "lines 11, ok 4, errors 7, skipped 0" in first.stdout
    rows = read_rows(dst)
    assert len(rows) == 11                                              # one per non-blank line
    assert [r.get("line") for r in rows if "error" in r] == [3, 4, 5, 6, 7, 11, 12]   # input order
    check_rows(rows, reference, GOOD, ERRORS)
    done_before = [json.dumps(r) for r in rows if "error" not in r]

    new = {"id": "new", "prompt": [9, 9, 8], "max_new_tokens": 4, "ignore_eos": True}
    write_jsonl(src, [*LINES, new])
    second = fabric_cli("run", "--input", str(src), "--output", str(dst), "--config", config_file,
                        env=embedded_env)
    assert second.returncode == 1, second.stderr[-3000:]
    assert "lines 12, ok 1, errors 7, skipped 4" in second.stdout
    rows = read_rows(dst)
    assert [json.dumps(r) for r in rows[:4]] == done_before             # kept, not redone
    added = rows[4:]
    assert sorted(r["id"] for r in added) == sorted([*ERRORS, "new"])   # only failed ids and new
    check_rows(added, reference, {"new": new}, ERRORS)


# ---- serve / status / run --name / scale / stop on a real head node ----------------------------
@pytest.fixture(scope="module")
def head(ray_head):
    return ray_head


def submit_job(head: dict, *args: str):
    return ray_head.submit_job(head, sys.executable, "-m", "fabric", *args)


def test_serve_status_run_scale_stop(tmp_path, head, config_file, reference):
    name = f"cli-{uuid.uuid4().hex[:6]}"
    target = ["--name", name, "--address", head["address"]]

    def call(*args):
        return fabric_cli(*args, *target, env=head["env"])

    served = call("serve", "--config", config_file)
    assert served.returncode == 0, served.stderr[-3000:]
    assert f"fabric {name!r} is serving" in served.stdout
    try:
        again = call("serve")
        assert again.returncode == 2 and "already running" in again.stderr
        status = call("status", "--window", "0")
        assert status.returncode == 0, status.stderr[-3000:]
        table = status.stdout.splitlines()
        assert table[1].split() == list(cli.STATUS_COLUMNS)
        assert [row.split()[2:6] for row in table[2:4]] == [["32", "32", "0", "0"]] * 2

        src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        good = {"ids": GOOD["ids"], "long": GOOD["long"]}
        write_jsonl(src, [GOOD["ids"], "{nope", GOOD["long"]])
        ran = call("run", "--input", str(src), "--output", str(dst))
        assert ran.returncode == 1 and "ok 2, errors 1" in ran.stdout, ran.stderr[-3000:]
        check_rows(read_rows(dst), reference, good, {"line-2": (2, "malformed JSON")})

        stats = json.loads(call("status", "--json").stdout)   # the fabric outlived the job
        assert sum(i["detail"]["num_generated"] for i in stats["instances"]) >= 108
        assert stats["lending"]["borrow_events"] >= 1

        job_out = tmp_path / "job.jsonl"        # under `ray job submit`: $RAY_ADDRESS, no --address
        job = submit_job(head, "run", "--name", name, "--input", str(src), "--output", str(job_out))
        assert "ok 2, errors 1" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
        assert without_metrics(job_out) == without_metrics(dst)

        scaled = call("scale", "--replicas", "3")           # elastic: a third replica joins
        assert scaled.returncode == 0, scaled.stderr[-3000:]
        event = json.loads(scaled.stdout)
        assert (event["from"], event["to"], event["bytes_loaded_from_disk"]) == (2, 3, 0)
        assert len(json.loads(call("status", "--json").stdout)["instances"]) == 3
        back = call("scale", "--replicas", "2")
        assert back.returncode == 0 and json.loads(back.stdout)["to"] == 2, back.stderr[-3000:]
        bad = call("scale", "--replicas", "0")
        assert bad.returncode == 2 and "--replicas must be >= 1" in bad.stderr
    finally:
        stopped = call("stop")
    assert stopped.returncode == 0 and f"fabric {name!r} stopped" in stopped.stdout, stopped.stderr
    gone = call("status")
    assert gone.returncode == 2 and f"no fabric named {name!r}" in gone.stderr
