"""Tuning on the CPU: best vs default, log round trip, resume, corrupt logs, workloads, block sizes, report."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import pgen
from pgen import cli, tune, tuning_log
from pgen.blocksize import length_samples, memory_model, study
from pgen.build import choose_configs
from pgen.target import host_target_id, parse_targets
from pgen_runtime.errors import TuneError
from pgen_runtime.measure import CPU_DECODE_KV_BYTES, default_workload
from pgen_runtime.spec import AttentionSpec
from pgen import schedules
from pgen.schedules.cpu_decode import CpuDecode

SPEC = AttentionSpec(num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype="float32")
SPEC_TOML = """[attention]
num_q_heads = 8
num_kv_heads = 2
head_dim = 64
block_size = 16
dtype = "float32"
"""
WORKLOAD = {"decode": {"seq_lens": [256, 256]}, "extend": {"seq_lens": [96, 64], "new_tokens": [32, 16]}}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """A log written through the CLI: decode and extend, 3 candidates each, a small workload."""
    root = tmp_path_factory.mktemp("tune")
    (root / "spec.toml").write_text(SPEC_TOML)
    (root / "workload.json").write_text(json.dumps(WORKLOAD))
    code = cli.main(["tune", "--spec", str(root / "spec.toml"), "--target", "llvm", "--kernels", "decode,extend",
                     "--trials", "3", "--workload", str(root / "workload.json"), "--logs", str(root / "logs")])
    assert code == 0
    return tuning_log.log_path(SPEC, host_target_id(), root / "logs")


def test_log_records_every_candidate(tuned):
    data = tuning_log.load(tuned, SPEC, "llvm")
    assert data["target_id"] == host_target_id() and data["spec_uri"] == SPEC.uri
    assert {"pgen", "tvm", "tvm_ffi"} <= data["versions"].keys()
    for kernel in ("decode", "extend"):
        recs = [r for r in data["records"] if r["kernel"] == kernel]
        assert len(recs) == 3 and sum(r["default"] for r in recs) == 1
        assert all(r["workload"] == WORKLOAD[kernel] and len(r["times_ms"]) == 10 for r in recs)


def test_best_is_no_slower_than_default(tuned):
    # The selection, not the machine: the best record's time never exceeds the default's. (A
    # re-measurement of both here was a timed assert, and failed under load: speed belongs in
    # bench/, and the tuner re-times its finalists beside the default itself.)
    data = tuning_log.load(tuned, SPEC, "llvm")
    for kernel, c in tuning_log.compare(data).items():
        assert c["default"] is not None and tuning_log.time_of(c["best"]) <= tuning_log.time_of(c["default"]), kernel


def test_build_uses_the_best_record(tuned, monkeypatch):
    monkeypatch.setenv("PGEN_TUNING_LOGS", str(tuned.parent.parent))
    choices = choose_configs(SPEC, parse_targets("llvm")[0])
    best = tuning_log.best(tuning_log.load(tuned))
    for kernel in ("decode", "extend"):
        assert choices[kernel].config == best[kernel][0]
        assert choices[kernel].source == f"tuned:{host_target_id()}"
    assert choices["cache_write"].source == "default"


def test_log_round_trip(tuned, tmp_path):
    data = tuning_log.load(tuned)
    copy = tmp_path / "copy.json"
    tuning_log.save(copy, json.loads(json.dumps(data)))
    again = tuning_log.load(copy, SPEC, "llvm")
    assert again["records"] == data["records"] and tuning_log.best(again) == tuning_log.best(data)


def test_resume_measures_nothing_again(tuned, monkeypatch):
    calls = []
    monkeypatch.setattr(tune.LocalRunner, "measure", lambda self, *a: calls.append(a) or {})
    before = tuned.read_text()
    tune.tune(SPEC, "llvm", ("decode", "extend"), 3, WORKLOAD, tuned.parent.parent)
    assert calls == [] and tuned.read_text() == before


def test_failed_candidate_gets_infinite_time(tmp_path):
    cand = tune.Candidate("decode", {"vector_lanes": 16}, WORKLOAD["decode"], "k", False)
    record = tune._time(tune.LocalRunner(), SPEC, cand, tmp_path / "missing.so")
    assert record["median_ms"] is None and record["times_ms"] == [] and record["error"]


def _corrupt(kind: str, good: str) -> str:
    data = json.loads(good)
    if kind == "bad_json":
        return "{ this is not json"
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "wrong_format":
        data["format"] = 99
    elif kind == "missing_records":
        del data["records"]
    elif kind == "wrong_spec":
        data["spec"]["head_dim"] = 128
    elif kind == "unknown_knob":
        data["records"][0]["config"]["warp_magic"] = 3
    elif kind == "bad_knob_value":
        data["records"][0]["config"]["vector_lanes"] = 3
    elif kind == "bad_time":
        data["records"][0]["median_ms"] = "fast"
    return json.dumps(data)


CORRUPTIONS = {"bad_json": "not JSON", "truncated": "not JSON", "wrong_format": "format 99",
               "missing_records": "lacks 'records'", "wrong_spec": "is for spec", "unknown_knob": "warp_magic",
               "bad_knob_value": "vector_lanes=3", "bad_time": "median_ms='fast'"}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_log_is_an_error_never_used(kind, tuned, tmp_path, monkeypatch, capsys):
    path = tuning_log.log_path(SPEC, host_target_id(), tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(_corrupt(kind, tuned.read_text()))
    with pytest.raises(TuneError, match=re.escape(CORRUPTIONS[kind])):
        tuning_log.load(path, SPEC, "llvm")
    monkeypatch.setenv("PGEN_TUNING_LOGS", str(tmp_path))
    with pytest.raises(TuneError):
        choose_configs(SPEC, parse_targets("llvm")[0])
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(SPEC_TOML)
    assert cli.main(["build", "--spec", str(spec_file)]) == 2
    assert "tuning log" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ('{"decode": {"seq_lens": []}}', "decode.seq_lens"),
    ('{"extend": {"seq_lens": [8], "new_tokens": [9]}}', "extend.new_tokens"),
    ('{"prefill": {}}', "sections"),
    ('{"decode": {"seq_lens": [8], "guard": {"seq_lens": [0]}}}', "decode.guard"),
    ('{"extend": {"seq_lens": [8], "new_tokens": [1], "guard": {"seq_lens": [8]}}}', "extend.guard"),
    ("[decode\nseq_lens = 1", "unreadable"),
])
def test_bad_workload_file(text, message, tmp_path):
    path = tmp_path / ("w.toml" if text.startswith("[") else "w.json")
    path.write_text(text)
    with pytest.raises(TuneError, match=re.escape(message)):
        tune.load_workload(path)


def test_workload_toml_with_lengths(tmp_path):
    path = tmp_path / "w.toml"
    path.write_text('[decode]\nseq_lens = [100, 200]\n[lengths]\nuniform = {min = 1, max = 64}\nforks_per_seq = 1\n')
    lens, forks = length_samples(tune.load_workload(path))
    assert forks == 1 and lens.min() >= 1 and lens.max() <= 64


def test_memory_model_terms():
    lens = np.array([17, 32, 40])
    m = memory_model(SPEC, 16, lens, forks_per_seq=0.5)
    assert m["wasted_slots"] == pytest.approx((15 + 0 + 8) / 3)
    token_bytes = 2 * 2 * 64 * 4
    useful = lens.mean() * token_bytes
    assert m["fragmentation"] == pytest.approx(m["wasted_slots"] * token_bytes / useful)
    assert m["table_overhead"] == pytest.approx(4 * (2 + 2 + 3) / 3 / useful)
    assert m["cow_bytes_per_fork"] == 16 * token_bytes
    assert m["cow_overhead"] == pytest.approx(0.5 * 16 * token_bytes / useful)


def test_block_size_study_and_report(tuned, tmp_path, capsys):
    workload = {"decode": {"seq_lens": [256, 256]}, "lengths": {"samples": [100, 250, 1000], "forks_per_seq": 1}}
    result = study(SPEC, [8, 16], workload, "llvm", ("decode",), 1, tuned.parent.parent)
    rows = {r["block_size"]: r for r in result["block_sizes"]}
    assert set(rows) == {8, 16} and result["recommended"] in rows
    assert all(r["times_ms"]["decode"] > 0 and r["score"] >= 1 for r in rows.values())
    assert rows[8]["memory_factor"] == 1.0 and rows[16]["fragmentation"] > rows[8]["fragmentation"]
    stored = tuning_log.load(tuned)["block_size_study"]
    assert stored["recommended"] == result["recommended"]

    out = tmp_path / "report.html"
    assert cli.main(["report", str(tuned), "-o", str(out)]) == 0
    html = out.read_text()
    for section in ('class="device"', 'class="summary"', 'class="kernel"', 'class="block-size"'):
        assert section in html
    assert html.count('<img alt="') == 2 * 2 + 1  # two charts per kernel, one block-size chart
    assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/]{100,}', html)
    assert "tuned / default" in html and SPEC.uri in html


def test_records_of_older_schedule_code_are_not_used(tuned, tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    shutil.copytree(tuned.parent.parent, logs)
    stale = logs / tuned.parent.name / tuned.name
    data = json.loads(stale.read_text())
    for rec in data["records"]:
        rec["schedule"] = "0ld5c4edu1e0"  # measured with code that has changed since
    # Knobs of older code may have changed since: a stale record's values are history, not an error.
    data["records"][0]["config"]["vector_lanes"] = 3
    stale.write_text(json.dumps(data))
    tuning_log.load(stale, SPEC, "llvm")
    monkeypatch.setenv("PGEN_TUNING_LOGS", str(logs))
    choices = choose_configs(SPEC, parse_targets("llvm")[0])
    for kernel in ("decode", "extend"):
        assert choices[kernel].source == "default:stale-log"
        assert choices[kernel].config == schedules.default_config(kernel, SPEC, parse_targets("llvm")[0].info)


def test_a_new_run_drops_the_records_of_older_schedule_code(tuned, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(tuned.parent.parent, logs)
    path = logs / tuned.parent.name / tuned.name
    data = json.loads(path.read_text())
    for rec in data["records"]:
        if rec["kernel"] == "extend":
            rec["schedule"] = "0ld5c4edu1e0"
    path.write_text(json.dumps(data))
    assert set(tuning_log.compare(data)) == {"decode"}  # a stale default is no baseline either
    tune.tune(SPEC, "llvm", ("extend",), 1, WORKLOAD, logs)
    after = json.loads(path.read_text())["records"]
    assert all(tuning_log.current(r, "llvm") for r in after)
    assert {r["kernel"] for r in after} == {"decode", "extend"}
    assert sum(r["kernel"] == "decode" for r in after) == sum(r["kernel"] == "decode" for r in data["records"])


def test_times_of_another_workload_do_not_compete(tuned):
    # An older run on a smaller workload has smaller times; the last workload's records decide.
    data = json.loads(tuned.read_text())
    decode = [r for r in data["records"] if r["kernel"] == "decode" and r["median_ms"] is not None]
    slowest = max(decode, key=tuning_log.time_of)
    small = {**slowest, "workload": {"seq_lens": [16]}, "median_ms": 1e-6, "confirm_ms": None,
             "config": {**slowest["config"], "max_splits": 1}}
    data["records"] = [small] + data["records"]
    config, t = tuning_log.best(data)["decode"]
    assert t >= min(tuning_log.time_of(r) for r in decode) and config != small["config"]
    data["records"] = data["records"][1:] + [small]  # now the small workload is the latest
    assert tuning_log.best(data)["decode"] == (small["config"], 1e-6)


@pytest.mark.parametrize(("speedup", "default_wins"), [(1.02, True), (1.029, True), (1.05, False)])
def test_the_default_stays_unless_a_tuned_config_beats_it_by_the_margin(tuned, speedup, default_wins):
    data = json.loads(tuned.read_text())
    decode = [r for r in data["records"] if r["kernel"] == "decode"]
    for r in decode:  # search times only, the others far slower
        r.update(median_ms=2.0, error=None)
        r.pop("confirm_ms", None)
    default = next(r for r in decode if tuning_log.is_default(data, r))
    other = next(r for r in decode if not tuning_log.is_default(data, r))
    default["median_ms"], other["median_ms"] = 1.0, 1.0 / speedup
    assert tuning_log.DEFAULT_MARGIN == 1.03
    config, t = tuning_log.best(data)["decode"]
    assert (config, t) == ((default["config"], 1.0) if default_wins else (other["config"], 1.0 / speedup))
    assert tuning_log.compare(data)["decode"]["fastest_ms"] == 1.0 / speedup  # the summary says it was kept


def test_cpu_decode_is_timed_on_a_kv_set_far_above_the_caches():
    llama = pgen.load_spec(Path(__file__).parents[2] / "specs" / "llama3-8b.toml")
    lens = default_workload("decode", "cpu", llama)["seq_lens"]
    assert len(lens) * max(lens) * llama.block_bytes // llama.block_size >= CPU_DECODE_KV_BYTES
    # A GPU tuning batch is large; its guard step is one long sequence (see the guard tests).
    assert default_workload("decode", "cuda", llama) == {"seq_lens": [4096] * 32, "guard": {"seq_lens": [16384]}}


def test_cpu_extend_is_timed_on_a_step_that_mixes_prefill_and_decode_rows():
    # The engine runs CPU decode steps through extend: a config tuned on prefill chunks alone
    # (the transposed QK loop) made one-token steps 13-26% slower.
    w = default_workload("extend", "cpu")
    new = w["new_tokens"]
    assert len(new) == len(w["seq_lens"]) and all(1 <= n <= s for n, s in zip(new, w["seq_lens"]))
    assert new.count(1) >= 16 and max(new) >= 128


def test_log_writes_number_lists_on_one_line_and_leaves_strings_alone(tmp_path):
    data = {"records": [{"workload": {"seq_lens": [4096] * 64}, "times": [1.5e-3, 2.0], "nested": [[1, 2], [3]],
                         "error": "shape [ 2, 3 ] is wrong"}]}
    path = tmp_path / "log.json"
    tuning_log.save(path, json.loads(json.dumps(data)))
    text = path.read_text()
    assert '"seq_lens": [' + ", ".join(["4096"] * 64) + "]" in text and '"times": [0.0015, 2.0]' in text
    assert '"error": "shape [ 2, 3 ] is wrong"' in text
    saved = json.loads(text)
    saved.pop("date")
    assert saved == data


def test_offline_bundle_keeps_only_candidates_whose_output_matches_the_reference(tmp_path, monkeypatch):
    from pgen_runtime import measure

    bundle = tune.emit_bundle(SPEC, "llvm", tmp_path / "bundle", trials=1, workloads=WORKLOAD, jobs=1)
    results = measure.measure_bundle(bundle, "cpu", progress=lambda line: None)
    assert [r["kernel"] for r in results["results"]] == ["decode", "extend"]
    assert all(r["error"] is None and r["median_ms"] > 0 for r in results["results"])
    # Against a wrong reference every candidate is rejected, with no time: ingest can never pick it.
    right = measure.reference_output
    monkeypatch.setattr(measure, "reference_output", lambda *args: right(*args) + 0.5)
    results = measure.measure_bundle(bundle, "cpu", progress=lambda line: None)
    assert all(r["median_ms"] is None and "wrong result" in r["error"] for r in results["results"])
    (tmp_path / "results.json").write_text(json.dumps(results))
    log = tuning_log.load(tune.ingest(tmp_path / "results.json", bundle, tmp_path / "logs"), SPEC, "llvm")
    assert tuning_log.best(log) == {}


def test_local_tuning_rejects_a_candidate_whose_output_is_wrong(tmp_path, monkeypatch):
    from pgen_runtime import measure

    target = parse_targets("llvm")[0]
    config = schedules.default_config("extend", SPEC, target.info)
    library = tune._build_candidate(SPEC, target, "extend", config, tmp_path / "cand")
    cand = tune.Candidate("extend", config, WORKLOAD["extend"], "k", True)
    assert tune._time(tune.LocalRunner(), SPEC, cand, library)["error"] is None
    right = measure.reference_output
    monkeypatch.setattr(measure, "reference_output", lambda *args: right(*args) * 1.01)
    record = tune._time(tune.LocalRunner(), SPEC, cand, library)
    assert record["median_ms"] is None and "wrong result" in record["error"]


def test_a_config_much_slower_than_the_default_on_the_guard_step_is_never_the_tuned_one(tuned):
    data = json.loads(tuned.read_text())
    decode = [r for r in data["records"] if r["kernel"] == "decode" and r["median_ms"] is not None]
    default = next(r for r in decode if r.get("default"))
    others = [r for r in decode if not r.get("default")]
    assert others
    workload = {**default["workload"], "guard": {"seq_lens": [512]}}
    fast = {**others[0], "workload": workload, "median_ms": 1e-6, "confirm_ms": None, "guard_ms": 2.0}
    data["records"] = [r for r in data["records"] if r["kernel"] != "decode"] + [
        {**default, "workload": workload, "confirm_ms": None, "guard_ms": 1.0}, fast]
    # 2x the default's guard time: out, however fast on the tuning batch (also from the finalists).
    assert tuning_log.best(data)["decode"][0] == default["config"]
    assert fast not in tuning_log.within_guard(data["records"], data)
    # Within GUARD_SLOWDOWN of it: the faster config wins.
    fast["guard_ms"] = tuning_log.GUARD_SLOWDOWN * 0.99
    assert tuning_log.best(data)["decode"] == (fast["config"], 1e-6)
    # A failed default sets no limit.
    data["records"][-2]["error"] = "boom"
    fast["guard_ms"] = 10.0
    assert tuning_log.best(data)["decode"] == (fast["config"], 1e-6)


def test_candidates_are_timed_and_checked_on_the_workloads_guard_step_offline_and_here(tmp_path, monkeypatch):
    from pgen_runtime import measure

    workloads = {"decode": {"seq_lens": [256, 256], "guard": {"seq_lens": [600]}}}
    bundle = tune.emit_bundle(SPEC, "llvm", tmp_path / "bundle", kernels=("decode",), trials=2, workloads=workloads, jobs=1)
    results = measure.measure_bundle(bundle, "cpu", progress=lambda line: None)
    assert all(r["error"] is None and r["guard_ms"] > 0 for r in results["results"])
    (tmp_path / "results.json").write_text(json.dumps(results))
    path = tune.ingest(tmp_path / "results.json", bundle, tmp_path / "logs")
    log = tuning_log.load(path, SPEC, "llvm")
    assert all(r["guard_ms"] > 0 for r in log["records"])
    # Ingesting again adds nothing, and drops the records of older schedule code.
    n = len(log["records"])
    log["records"].append({**log["records"][0], "key": "old", "schedule": "0" * 16})
    tuning_log.save(path, log)
    again = tuning_log.load(tune.ingest(tmp_path / "results.json", bundle, tmp_path / "logs"), SPEC, "llvm")
    assert len(again["records"]) == n and all(r["key"] != "old" for r in again["records"])
    # The local runner too; a wrong output on the guard step fails the candidate.
    target = parse_targets("llvm")[0]
    config = schedules.default_config("decode", SPEC, target.info)
    library = tune._build_candidate(SPEC, target, "decode", config, tmp_path / "cand")
    cand = tune.Candidate("decode", config, workloads["decode"], "k", True)
    assert tune._time(tune.LocalRunner(), SPEC, cand, library)["guard_ms"] > 0
    right = measure.reference_output
    monkeypatch.setattr(measure, "reference_output",
                        lambda spec, kernel, arrays: right(spec, kernel, arrays) + (len(arrays[3][0]) == 1))
    record = tune._time(tune.LocalRunner(), SPEC, cand, library)
    assert record["median_ms"] is None and "wrong result" in record["error"]


def test_neighbours_are_every_valid_one_knob_move_with_the_plan_caps_kept():
    target = parse_targets("llvm")[0]
    rule = CpuDecode()
    config = {**rule.default(SPEC, target.info), "qk_key_group": 1}
    got = tune.neighbours(SPEC, target, "decode", config)
    want = [{**config, k.name: v} for k in rule.knobs(SPEC, target.info) if k.name not in tune.PLAN_CAPS
            for v in k.choices if v != config[k.name]]
    want = [c for c in want if rule.check(SPEC, target.info, c) is None]
    assert got == want and len(got) > 10
    assert all(sum(c[k] != config[k] for k in config) == 1 and c["max_splits"] == config["max_splits"] for c in got)
    # qk_key_group is on: the transposed QK loop (the other of the two) is no neighbour.
    assert all(not c["qk_transpose"] for c in got)


class _SyntheticRunner:
    """Times a config by a made-up cost: 10 ms, 1 less for each of seven knob values (one config in
    1,728 has all seven: a random sample rarely holds it). One knob at a time the search can reach
    it from any other config."""

    workers, overlap = 1, False
    GOOD = {"kv_streams": 2, "touch_v": 0, "prefetch_locality": 3, "prefetch_ahead": 8, "vector_lanes": 8,
            "qk_chains": 1, "prefetch_next_head": 0}

    def device_info(self):
        return {"kind": "cpu", "name": host_target_id()}

    def cost(self, config):
        return 10.0 - sum(config.get(k) == v for k, v in self.GOOD.items())

    def measure(self, spec, cand, library):
        t = self.cost(cand.config)
        return {"times_ms": [t], "median_ms": t, "error": None}


@pytest.fixture
def synthetic(monkeypatch):
    """Candidates 'built' instantly and timed by `_SyntheticRunner` (no compiler, no kernels)."""
    runner = _SyntheticRunner()

    def build_and_time(spec, target, todo, runner_, jobs, record):
        for cand in todo:
            record(cand, runner_.measure(spec, cand, None))

    monkeypatch.setattr(tune, "_build_and_time", build_and_time)
    monkeypatch.setattr(tune, "_build_candidate", lambda spec, target, kernel, config, out: out / "kernels.so")
    return runner


def test_refinement_climbs_from_the_fastest_config_one_knob_at_a_time(synthetic, tmp_path):
    target = parse_targets("llvm")[0]
    trials = 140
    path = tune.tune(SPEC, "llvm", ("decode",), trials, WORKLOAD, tmp_path, jobs=1, runner=synthetic)
    recs = json.loads(path.read_text())["records"]
    sample = tune.sample_size(trials)
    assert len(recs) == trials and sample == 70
    # The sample first, then each refined config one knob away from the fastest measured before it
    # (or, where all of that one's neighbours were measured, from the next fastest).
    assert [r["config"] for r in recs[:sample]] == tune.candidates(SPEC, target, "decode", sample)
    for i in range(sample, trials):
        before = sorted(recs[:i], key=lambda r: r["median_ms"])
        measured = [r["config"] for r in recs[:i]]
        origin = next(r for r in before if any(c not in measured for c in tune.neighbours(SPEC, target, "decode", r["config"])))
        assert recs[i]["config"] in tune.neighbours(SPEC, target, "decode", origin["config"]), i
    # A separable cost: the local optimum it climbed to is the fastest config of the space, and
    # every neighbour of it was measured.
    best = min(recs, key=lambda r: r["median_ms"])
    assert best["median_ms"] == 3.0 and all(best["config"][k] == v for k, v in synthetic.GOOD.items())
    assert all(c in [r["config"] for r in recs] for c in tune.neighbours(SPEC, target, "decode", best["config"]))
    assert tuning_log.best(tuning_log.load(path, SPEC, "llvm"))["decode"][0] == best["config"]


def test_refinement_resumes_and_a_failed_or_guard_failing_config_is_never_climbed_from(synthetic, tmp_path):
    target = parse_targets("llvm")[0]
    path = tune.tune(SPEC, "llvm", ("decode",), 6, WORKLOAD, tmp_path, jobs=2, runner=synthetic)
    log = json.loads(path.read_text())
    assert len(log["records"]) == 6
    # Resume with a larger budget: the 6 are kept, 4 more measured, none twice.
    path = tune.tune(SPEC, "llvm", ("decode",), 10, WORKLOAD, tmp_path, jobs=2, runner=synthetic)
    recs = json.loads(path.read_text())["records"]
    assert [(r["key"], r["median_ms"]) for r in recs[:6]] == [(r["key"], r["median_ms"]) for r in log["records"]]
    assert len(recs) == 10 and len({r["key"] for r in recs}) == 10
    # A failed record, however its time reads, is never the origin of a move.
    log = {"target_kind": "llvm", "device": {}, "spec": SPEC.to_dict(),
           "records": [{**recs[0], "median_ms": 0.1, "error": "boom"}]}
    grown = []

    def record(cand, result):
        log["records"].append({"kernel": cand.kernel, "config": cand.config, "workload": cand.workload,
                               "key": cand.key, **result})
        grown.append(cand)

    tune._refine(SPEC, target, log, "decode", WORKLOAD["decode"], 2, synthetic, 1, record)
    assert grown == []
    # Nor is a config too slow on the guard step: the climb starts from the default.
    default = schedules.default_config("decode", SPEC, target.info)
    far = {**default, "kv_streams": 2, "touch_v": 0, "vector_lanes": 8}
    workload = {**WORKLOAD["decode"], "guard": {"seq_lens": [600]}}
    log["records"] = [{"kernel": "decode", "config": default, "workload": workload, "key": "d", "default": True,
                       "median_ms": 5.0, "guard_ms": 1.0, "error": None},
                      {"kernel": "decode", "config": far, "workload": workload, "key": "f", "default": False,
                       "median_ms": 1.0, "guard_ms": 5.0, "error": None}]
    tune._refine(SPEC, target, log, "decode", workload, 3, synthetic, 1, record)
    assert len(grown) == 1 and grown[0].config in tune.neighbours(SPEC, target, "decode", default)


def test_an_offline_bundle_refines_from_the_devices_log(tmp_path, capsys):
    # Round 1: a sample. Its results ingested, round 2 (--refine-from that log) holds the default
    # and configs the log lacks, one knob away from its fastest, fastest first.
    from pgen_runtime import measure

    target = parse_targets("llvm")[0]
    workloads = {"decode": WORKLOAD["decode"]}
    first = tune.emit_bundle(SPEC, "llvm", tmp_path / "b1", kernels=("decode",), trials=2, workloads=workloads, jobs=1)
    (tmp_path / "r1.json").write_text(json.dumps(measure.measure_bundle(first, "cpu", progress=lambda line: None)))
    log_path = tune.ingest(tmp_path / "r1.json", first, tmp_path / "logs")
    log = tuning_log.load(log_path, SPEC, "llvm")
    fastest = min(log["records"], key=lambda r: r["median_ms"])
    assert len(log["records"]) == 2
    (tmp_path / "spec.toml").write_text(SPEC_TOML)
    (tmp_path / "w.json").write_text(json.dumps(workloads))
    assert cli.main(["tune", "--spec", str(tmp_path / "spec.toml"), "--kernels", "decode", "--trials", "3",
                     "--workload", str(tmp_path / "w.json"), "--offline", str(tmp_path / "b2"),
                     "--refine-from", str(log_path)]) == 0
    second = json.loads((tmp_path / "b2" / measure.BUNDLE).read_text())["candidates"]
    near = tune.neighbours(SPEC, target, "decode", fastest["config"])
    measured = [r["config"] for r in log["records"]]
    default = schedules.default_config("decode", SPEC, target.info)
    assert [c["config"] for c in second] == [default] + [c for c in near if c not in measured][:2]
    (tmp_path / "r2.json").write_text(json.dumps(measure.measure_bundle(tmp_path / "b2", "cpu",
                                                                         progress=lambda line: None)))
    # The default was measured in round 1: the log keeps that measurement and gains the two others.
    assert len(tuning_log.load(tune.ingest(tmp_path / "r2.json", tmp_path / "b2", tmp_path / "logs"))["records"]) == 4
    # Without records on the bundle's workload, the sample; without --offline, a clear error.
    other = tune.emit_bundle(SPEC, "llvm", tmp_path / "b3", kernels=("extend",), trials=2, workloads=WORKLOAD, jobs=1,
                             refine_from=log_path)
    assert [c["config"] for c in json.loads((other / measure.BUNDLE).read_text())["candidates"]] == \
        tune.candidates(SPEC, target, "extend", 2)
    assert cli.main(["tune", "--spec", str(tmp_path / "spec.toml"), "--refine-from", str(log_path)]) != 0
    assert "--refine-from goes with --offline" in capsys.readouterr().err
