"""Hostile workflow files: alias bombs, huge, deep, binary files and bad names are refused quickly with
exit 2 and the line at fault; nothing raw reaches the terminal; loading is linear in the file's size."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ampel_dask.graph.plan import plan_workflow
from ampel_dask.graph.safe_yaml import YamlFileError, YamlLimits, read_yaml
from ampel_dask.graph.workflow import WorkflowError, load_workflow

MEMORY_LIMIT = str(1_000_000_000)  # address space for a CLI run that must not inflate a bomb (startup needs ~0.6 GB)


def cli(*args: str, env: dict | None = None, memory: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ampel_dask.cli", *args]
    if memory:
        prlimit = shutil.which("prlimit")
        assert prlimit, "prlimit (util-linux) is needed to run a bomb under a memory limit"
        cmd = [prlimit, f"--as={memory}", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def raw_controls(text: str) -> set[str]:
    """Control and other non-printable characters in CLI output, line breaks aside."""
    return {c for c in text if c != "\n" and not c.isprintable()}


def line_of(text: str, needle: str, start: int = 1) -> int:
    """1-based number of the first line (from ``start``) containing ``needle``: the oracle for error lines."""
    return next(i for i, ln in enumerate(text.splitlines(), 1) if i >= start and needle in ln)


def run_plan(path: Path, tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    """``ampel-dask run`` up to planning: the archive does not exist, so a workflow that loads and plans
    fails with 'not an ampel-dask archive' (exit 2) after every workflow check."""
    return cli("run", str(path), "--archive", str(tmp_path / "no-archive"), "--store", str(tmp_path / "store"), **kw)


# --- alias bombs: refused from the event stream, before anything is built -------------------------

LAUGHS = "\n".join(
    ["name: bomb", 'lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 10)}]" for i in range(1, 10)]
    + ["channels: [{name: A}]"]
)
IN_CONFIG = LAUGHS.replace("channels: [{name: A}]", "channels:\n  - name: A\n    t3: [{unit: T3Export, config: {columns: *lol9}}]")
MERGE = "\n".join(
    ["name: merge-bomb", "m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}"]
    + [f"m{i}: &m{i} {{x{i}: [*m{i - 1}, *m{i - 1}, *m{i - 1}, *m{i - 1}, *m{i - 1}, *m{i - 1}, *m{i - 1}, *m{i - 1}], <<: *m{i - 1}}}" for i in range(1, 10)]
    + ["channels: [{name: A, t3: [{unit: T3Export, config: {<<: *m9}}]}]"]
)


@pytest.mark.parametrize("text", [LAUGHS, IN_CONFIG, MERGE], ids=["billion-laughs", "bomb-in-unit-config", "merge-key-bomb"])
def test_alias_bomb_is_refused_with_exit_2_under_a_memory_limit(tmp_path, text):
    """A 1 KB file standing for 10^9 nodes: refused at the alias that crosses the node limit, in a
    process limited to 1 GB of address space (inflating it would take many GB: a regression fails with
    a MemoryError, exit 1, instead of taking the machine down)."""
    path = tmp_path / "bomb.yml"
    path.write_text(text)
    assert path.stat().st_size < 1500
    proc = run_plan(path, tmp_path, memory=MEMORY_LIMIT)
    assert proc.returncode == 2, proc.stderr
    # the line where the nodes cross 2,000,000: lol<k> stands for 10^(k+1) "lol" scalars and
    # (10^(k+1) - 1) / 9 lists, so the file up to lol5 holds 1.23 million nodes and lol6 crosses the limit
    if text is LAUGHS or text is IN_CONFIG:
        assert f"bomb.yml:{line_of(text, 'lol6: &lol6')}: more than 2,000,000 (AMPEL_DASK_WORKFLOW_MAX_NODES) YAML nodes" in proc.stderr, proc.stderr
    else:
        assert "bomb.yml:" in proc.stderr and "AMPEL_DASK_WORKFLOW_MAX_NODES" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_alias_inside_the_node_it_repeats_is_refused(tmp_path):
    path = tmp_path / "wf.yml"
    path.write_text("name: w\nchannels: &c\n  - name: A\n    t2: *c\n")
    with pytest.raises(WorkflowError, match=r"wf\.yml:4: alias \*c is inside the node it repeats \(a cycle\)"):
        load_workflow(path)
    path.write_text("name: w\nchannels:\n  - name: A\n    t2: *nowhere\n")
    with pytest.raises(WorkflowError, match=r"wf\.yml:4: alias \*nowhere repeats no anchor defined before it"):
        load_workflow(path)


# --- huge, deep, binary, special files ------------------------------------------------------------


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    """A sparse 1 TB file: its size is refused from fstat (reading it would not finish, and would not fit
    in the 1 GB the process may have)."""
    path = tmp_path / "huge.yml"
    path.write_text("name: huge\nchannels: [{name: A}]\n# ")
    os.truncate(path, 2**40)
    proc = run_plan(path, tmp_path, memory=MEMORY_LIMIT)
    assert proc.returncode == 2, proc.stderr
    assert f"huge.yml: {2**40:,} bytes, more than the 10,485,760 (AMPEL_DASK_WORKFLOW_MAX_BYTES)" in proc.stderr, proc.stderr


def test_file_size_limit_is_a_setting(tmp_path):
    path = tmp_path / "wf.yml"
    path.write_text("name: small\nchannels: [{name: A}]\n")
    size = path.stat().st_size
    assert load_workflow(path, YamlLimits(max_bytes=size)).name == "small"  # exactly at the limit: fine
    with pytest.raises(WorkflowError, match=rf"wf\.yml: {size} bytes, more than the {size - 1} \(AMPEL_DASK_WORKFLOW_MAX_BYTES\)"):
        load_workflow(path, YamlLimits(max_bytes=size - 1))
    proc = run_plan(path, tmp_path, env={"AMPEL_DASK_WORKFLOW_MAX_BYTES": str(size - 1)})
    assert proc.returncode == 2 and f"{size} bytes, more than the {size - 1} (AMPEL_DASK_WORKFLOW_MAX_BYTES)" in proc.stderr, proc.stderr
    proc = run_plan(path, tmp_path, env={"AMPEL_DASK_WORKFLOW_MAX_DEPTH": "deep"})
    assert proc.returncode == 2 and "AMPEL_DASK_WORKFLOW_MAX_DEPTH='deep': a positive whole number is expected" in proc.stderr, proc.stderr
    assert YamlLimits.from_env({"AMPEL_DASK_WORKFLOW_MAX_NODES": "5", "AMPEL_DASK_WORKFLOW_MAX_DEPTH": "3"}) == YamlLimits(max_nodes=5, max_depth=3)
    with pytest.raises(YamlFileError, match="AMPEL_DASK_WORKFLOW_MAX_BYTES='0'"):
        YamlLimits.from_env({"AMPEL_DASK_WORKFLOW_MAX_BYTES": "0"})


@pytest.mark.parametrize("style", ["flow", "block"])
def test_deep_nesting_is_refused_with_its_line(tmp_path, style):
    """100,000 nested brackets (recursive YAML composers overflow the stack) or 100 indented levels."""
    head = "name: deep\nchannels:\n  - name: A\n    t3:\n      - unit: T3Export\n        config:\n"
    if style == "flow":
        text = head + "          columns: " + "[" * 100_000 + "]" * 100_000 + "\n"
        expected_line = 7
    else:
        text = head + "".join("  " * (5 + i) + f"k{i}:\n" for i in range(100)) + "  " * 105 + "leaf\n"
        # depth: root, channels, channel, t3, item, config = 6 collections, then k0 ... : the 65th
        # collection is the value of k58, which starts on k59's line
        expected_line = line_of(text, "k59:")
    path = tmp_path / "deep.yml"
    path.write_text(text)
    proc = run_plan(path, tmp_path)
    assert proc.returncode == 2, proc.stderr
    if style == "block":
        assert f"deep.yml:{expected_line}: nested more than 64 (AMPEL_DASK_WORKFLOW_MAX_DEPTH) levels deep" in proc.stderr, proc.stderr
    else:  # libyaml's own flow-level limit or ours, whichever comes first: the line either way
        assert f"deep.yml:{expected_line}: " in proc.stderr and "nest" in proc.stderr, proc.stderr


def test_binary_and_control_character_files_exit_2_with_the_line(tmp_path, data_dir):
    """A real alert packet given as a workflow: not UTF-8, named with the line and byte offset."""
    raw = next((data_dir / "ztf/fink_local_202001").glob("*.avro")).read_bytes()
    path = tmp_path / "packet.yml"
    path.write_bytes(raw)
    proc = run_plan(path, tmp_path)
    assert proc.returncode == 2, proc.stderr
    m = re.search(r"packet\.yml:(\d+): not UTF-8 text \(byte 0x([0-9a-f]{2}) at offset (\d+)\)", proc.stderr)
    assert m, proc.stderr
    line, byte, offset = int(m[1]), int(m[2], 16), int(m[3])
    # oracle: the bytes before the offset are text, the reported byte is there and no UTF-8 sequence starts at it
    raw[:offset].decode("utf-8")
    assert raw[offset] == byte and line == raw[:offset].count(b"\n") + 1
    assert all(not _utf8_sequence(raw[offset : offset + n]) for n in range(1, 5))
    assert not raw_controls(proc.stderr + proc.stdout)

    path = tmp_path / "nul.yml"  # valid UTF-8, but a NUL (and an ANSI escape) YAML does not allow
    path.write_bytes(b"name: w\nchannels:\n  - name: A\x00\x1b[2J\n")
    proc = run_plan(path, tmp_path)
    assert proc.returncode == 2 and "nul.yml:3: not valid YAML: character '\\x00' is not allowed in YAML" in proc.stderr, proc.stderr
    assert not raw_controls(proc.stderr + proc.stdout)


def _utf8_sequence(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_a_fifo_or_device_is_not_read(tmp_path):
    """A FIFO named like a workflow would block for ever; it is refused without waiting for a writer."""
    fifo = tmp_path / "wf.yml"
    os.mkfifo(fifo)
    proc = run_plan(fifo, tmp_path, timeout=60)
    assert proc.returncode == 2 and "wf.yml: not a regular file" in proc.stderr, proc.stderr
    with pytest.raises(WorkflowError, match="/dev/zero: not a regular file"):
        load_workflow("/dev/zero")


def test_values_yaml_cannot_convert_and_repeated_keys_name_their_line(tmp_path):
    path = tmp_path / "wf.yml"
    path.write_text("name: w\nchannels: [{name: A}]\nbatch_rows: " + "9" * 5000 + "\n")
    with pytest.raises(WorkflowError, match=r"wf\.yml:3: not valid YAML: '9{64}'\.\.\. \(5000 characters\): Exceeds the limit"):
        load_workflow(path)
    path.write_text("name: w\nchannels: [{name: A}]\narchive:\n  nights: [2023-13-45]\n")
    with pytest.raises(WorkflowError, match=r"wf\.yml:4: not valid YAML: '2023-13-45': month must be in 1\.\.12"):
        load_workflow(path)
    path.write_text("name: w\nchannels:\n  - name: A\n    t2: [T2LightCurveSummary]\n    name: B\n")
    with pytest.raises(WorkflowError, match=r"wf\.yml:5: key 'name' appears twice in one mapping \(first on line 3\)"):
        load_workflow(path)
    path.write_text("- a list\n- not a workflow\n")
    with pytest.raises(WorkflowError, match=r"wf\.yml:1: a workflow is a mapping"):
        load_workflow(path)


# --- names: safe folder names; nothing raw reaches the terminal -----------------------------------

BAD_NAMES = ["..", ".", "a\rb", "\x1b[31mred\x1b[0m", "a\x00b", "x" * 300, "a/b", "-dash", ""]


def test_bad_channel_names_exit_2_with_field_and_line_and_no_raw_control_characters(tmp_path):
    channels = "".join(f"  - name: {json.dumps(n)}\n    t2: [T2LightCurveSummary]\n" for n in BAD_NAMES)
    text = 'name: names\nchannels:\n' + channels + '  - name: OK\n    "\\e[2Jcolour\\r": blue\n'
    path = tmp_path / "wf.yml"
    path.write_text(text)
    proc = run_plan(path, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert not raw_controls(proc.stderr + proc.stdout), repr(proc.stderr)
    for i, name in enumerate(BAD_NAMES):
        line = line_of(text, "- name:", start=3 + 2 * i)
        shown = repr(name) if len(name) <= 64 else f"{name[:64]!r}... ({len(name)} characters)"
        assert f"wf.yml:{line}: channels[{i}].name: Value error, channel name {shown} is not allowed" in proc.stderr, (name, proc.stderr)
    colour = line_of(text, "colour")
    assert f"wf.yml:{colour}: channels[{len(BAD_NAMES)}].'\\x1b[2Jcolour\\r': Extra inputs are not permitted" in proc.stderr, proc.stderr


ALLOWED = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def name_is_safe(name: str) -> bool:
    """The rule in plain words: 1-64 characters from letters, digits, '_', '.', '-', the first a letter or digit."""
    return 1 <= len(name) <= 64 and all(c in ALLOWED for c in name) and name[0] not in "_.-"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(alphabet=sorted(ALLOWED), max_size=70), st.text(max_size=70)))
def test_channel_names_accepted_are_exactly_the_safe_folder_names(name):
    from ampel_dask.graph.workflow import ChannelSpec

    try:
        ChannelSpec(name=name)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == name_is_safe(name)
    if accepted:  # a folder named so stays inside its parent
        root = Path("/store/states")
        assert (root / name).resolve().parent == root and name not in (".", "..")


# --- unit configs naming files that are not what they should be -----------------------------------


def _model_workflow(unit: str, field: str, target: str) -> str:
    return f"name: files\nchannels:\n  - name: A\n    t2:\n      - unit: {unit}\n        config:\n          {field}: {json.dumps(target)}\n"


def test_a_text_file_as_model_or_catalog_exits_2_with_field_and_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a model\n" * 20)
    for unit, field in [("T2Classifier", "model"), ("T2CatalogMatch", "catalog")]:
        wf = _model_workflow(unit, field, str(text))
        path = tmp_path / "wf.yml"
        path.write_text(wf)
        proc = run_plan(path, tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert f"wf.yml:{line_of(wf, 'config:')}: channels[0] (A).t2[0] ({unit}): ValueError: {text}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_device_as_model_is_refused_not_read(tmp_path):
    """``model: /dev/zero`` would be hashed for ever."""
    path = tmp_path / "wf.yml"
    path.write_text(_model_workflow("T2Classifier", "model", "/dev/zero"))
    proc = run_plan(path, tmp_path, timeout=60)
    assert proc.returncode == 2 and "channels[0] (A).t2[0] (T2Classifier): ValueError: /dev/zero: not a regular file" in proc.stderr, proc.stderr


def test_files_that_are_not_models_or_catalogs_name_the_field(tmp_path, data_dir):
    """Random bytes, pickles of other things, a bundle missing its metadata, a real Parquet file that is
    not a catalog, a folder: each a WorkflowError at the unit's config line, never a bare Python error."""
    import pickle

    import joblib

    files = {
        "random.joblib": random.Random(23).randbytes(4096),
        "list.joblib": pickle.dumps([1, 2, 3]),
        "partial.joblib": None,
        "text.parquet": b"PAR1 not really PAR1",
    }
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    joblib.dump({"format": "ampel_dask.classifier/1", "model": None}, tmp_path / "partial.joblib")
    cases = [("T2Classifier", "model", tmp_path / n) for n in ("random.joblib", "list.joblib", "partial.joblib")]
    cases += [("T2Classifier", "model", tmp_path)]
    cases += [("T2CatalogMatch", "catalog", tmp_path / "text.parquet"), ("T2CatalogMatch", "catalog", data_dir / "parquet/fink_ztf_alerts.parquet")]
    for unit, field, target in cases:
        text = _model_workflow(unit, field, str(target))
        path = tmp_path / "wf.yml"
        path.write_text(text)
        with pytest.raises(WorkflowError) as err:
            plan_workflow(load_workflow(path))
        assert str(err.value).startswith(f"{path}:{line_of(text, 'config:')}: channels[0] (A).t2[0] ({unit}): "), (target, err.value)
        assert str(target) in str(err.value)


# --- linear time ----------------------------------------------------------------------------------


def _many_channels(n: int) -> str:
    return "name: many\nchannels:\n" + "".join(
        f"  - name: C{i:06d}\n    filters: [{{unit: ExpressionFilter, config: {{expr: \"ndet >= 2\"}}}}]\n    t2: [T2LightCurveSummary]\n" for i in range(n)
    )


def test_loading_scales_linearly_with_the_number_of_channels(tmp_path):
    """8x the channels cost ~8x the CPU time to load, not 64x: the unique-name check was quadratic (with
    it, 16,000 channels cost 34x 2,000; 70,000 did not load in 200 s). A ratio of CPU times (best of a
    few runs), never a time limit; the bound is twice the linear ratio."""
    costs = {}
    for n, runs in ((2_000, 3), (16_000, 2)):
        path = tmp_path / f"wf{n}.yml"
        path.write_text(_many_channels(n))
        best = float("inf")
        for _ in range(runs):
            t = time.process_time()
            wf = load_workflow(path)
            best = min(best, time.process_time() - t)
        assert len(wf.channels) == n and wf.channels[-1].name == f"C{n - 1:06d}"
        assert wf.where(("channels", n - 1, "t2", 0)) == f"{path}:{3 * n + 2}: "  # the last channel's t2 line
        costs[n] = best
    ratio = costs[16_000] / costs[2_000]
    assert ratio < 16, f"8x channels cost {ratio:.1f}x ({costs})"


# --- the event scan against independent oracles ---------------------------------------------------


def _expanded(obj, memo: dict) -> tuple[int, int]:
    """(nodes, collection depth) of a constructed document, shared objects counted every time they
    appear: what an alias stands for. Scalars are 1 node of depth 0; a mapping counts keys and values."""
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, dict):
        parts = [_expanded(k, memo) for k in obj] + [_expanded(v, memo) for v in obj.values()]
    elif isinstance(obj, list):
        parts = [_expanded(v, memo) for v in obj]
    else:
        return 1, 0
    out = (1 + sum(p[0] for p in parts), 1 + max((p[1] for p in parts), default=0))
    memo[key] = out
    return out


scalars = st.one_of(st.integers(-1000, 1000), st.text(alphabet="abcxyz ", max_size=5), st.none(), st.booleans())


@st.composite
def shared_documents(draw):
    """A mapping whose values reuse earlier collections (yaml.safe_dump writes them as anchors + aliases)."""
    pool: list = []
    for _ in range(draw(st.integers(1, 12))):
        items = draw(st.lists(st.one_of(scalars, st.sampled_from(pool) if pool else scalars), max_size=4))
        pool.append(items if draw(st.booleans()) else {f"k{i}": v for i, v in enumerate(items)})
    return {f"top{i}": draw(st.sampled_from(pool)) for i in range(draw(st.integers(1, 4)))}


@settings(max_examples=150, deadline=None)
@given(shared_documents())
def test_node_and_depth_limits_count_what_aliases_stand_for(doc):
    text = yaml.safe_dump(doc)
    nodes, depth = _expanded(doc, {})  # on the Python objects: a shared one is what yaml.safe_dump writes as an alias
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.yml"
        path.write_text(text)
        data, _ = read_yaml(path, YamlLimits(max_nodes=nodes, max_depth=depth))
        assert data == doc
        with pytest.raises(YamlFileError, match="YAML nodes"):
            read_yaml(path, YamlLimits(max_nodes=nodes - 1, max_depth=depth))
        with pytest.raises(YamlFileError, match="levels deep"):
            read_yaml(path, YamlLimits(max_nodes=nodes, max_depth=depth - 1))


def _reference_marks(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """The former line pass, on PyYAML's composed nodes (fine for documents without aliases)."""
    out = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out.update({p: ln for p, ln in _reference_marks(v, path + (k.value,)).items() if p != path + (k.value,)})
            out[path + (k.value,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.update(_reference_marks(item, path + (i,)))
    return out


trees = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(alphabet="abcdef", min_size=1, max_size=3), inner, max_size=4)),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(alphabet="abcdef", min_size=1, max_size=3), trees, min_size=1, max_size=4), st.booleans())
def test_lines_match_the_composed_nodes(doc, flow):
    text = yaml.safe_dump(doc, default_flow_style=flow, width=30)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.yml"
        path.write_text(text)
        data, lines = read_yaml(path)
    assert data == doc
    assert lines == _reference_marks(yaml.compose(text))
