"""Data through the datasets library: every local source gives the same rows as the JSONL file; errors name the
file and the row; the hub path runs against a loopback Hub."""

import json
import tracemalloc

import pytest
from train_helpers import write_jsonl

from lorakit.errors import DataError
from lorakit.training.data import split_train_eval
from lorakit.training.formats import RowSpec
from lorakit.training.sources import DatasetRows, read_rows

datasets = pytest.importorskip("datasets")

ROWS = [{"prompt": f"up {w}", "completion": w.upper()} for w in ("abc", "bad", "cab", "dab", "fed", "ace")]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    datasets.disable_progress_bars()


def pairs(rows):
    return [(r.format, r.data["prompt"], r.data["completion"]) for r in rows]


def as_table():
    return datasets.Dataset.from_list(ROWS)


@pytest.mark.parametrize("kind", ["csv", "parquet", "json", "arrow", "saved", "saved_dict", "glob", "several"])
def test_every_local_source_reads_like_the_jsonl_file(tmp_path, kind):
    expected = pairs(read_rows(write_jsonl(tmp_path / "ref.jsonl", ROWS)))
    d = tmp_path / "src"
    d.mkdir()
    table = as_table()
    if kind == "csv":
        table.to_csv(d / "a.csv", index=False)
        path = d / "a.csv"
    elif kind == "parquet":
        table.to_parquet(d / "a.parquet")
        path = d  # a folder of data files
    elif kind == "json":
        (d / "a.json").write_text(json.dumps(ROWS))  # one JSON array
        path = d / "a.json"
    elif kind == "arrow":
        table.save_to_disk(d / "saved")
        path = next((d / "saved").glob("*.arrow"))
    elif kind == "saved":
        table.save_to_disk(d / "saved")
        path = d / "saved"
    elif kind == "saved_dict":
        datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(d / "saved")
        path = d / "saved"
    elif kind == "glob":
        table.select(range(3)).to_parquet(d / "part-0.parquet")
        table.select(range(3, 6)).to_parquet(d / "part-1.parquet")
        path = f"{d}/part-*.parquet"
    else:
        table.select(range(3)).to_csv(d / "x.csv", index=False)
        write_jsonl(d / "y.jsonl", ROWS[3:])
        path = f"{d / 'x.csv'},{d / 'y.jsonl'}"
    rows = read_rows(path)
    assert isinstance(rows, DatasetRows) and pairs(rows) == expected


def test_saved_dataset_dict_split_is_chosen_and_an_unknown_one_is_named(tmp_path):
    datasets.DatasetDict({"train": as_table(), "test": as_table().select([0])}).save_to_disk(tmp_path / "s")
    assert pairs(read_rows(tmp_path / "s", split="test")) == pairs(read_rows(tmp_path / "s"))[:1]
    with pytest.raises(DataError, match=r"splits \['test', 'train'\], not 'dev'"):
        read_rows(tmp_path / "s", split="dev")


def test_csv_row_fitting_no_format_names_file_row_and_keys(tmp_path):
    (tmp_path / "t.csv").write_text("prompt,completion\nup abc,ABC\nup bad,\n")
    with pytest.raises(
        DataError, match=r"t.csv row 2: has keys \['completion', 'prompt'\]; expected .*--skip-bad-lines"
    ):
        read_rows(tmp_path / "t.csv")
    rows = read_rows(tmp_path / "t.csv", skip_bad_lines=True)
    assert pairs(rows) == [("prompt_completion", "up abc", "ABC")]


def test_parquet_with_renamed_columns_and_alpaca_format(tmp_path):
    datasets.Dataset.from_list([{"q": "2+2?", "a": "4"}]).to_parquet(tmp_path / "qa.parquet")
    rows = read_rows(tmp_path / "qa.parquet", RowSpec(prompt_column="q", completion_column="a"))
    assert pairs(rows) == [("prompt_completion", "2+2?", "4")]
    datasets.Dataset.from_list([{"instruction": "up", "input": "abc", "output": "ABC"}]).to_csv(tmp_path / "al.csv")
    assert pairs(read_rows(tmp_path / "al.csv", RowSpec(format="alpaca"))) == [
        ("prompt_completion", "up\n\nabc", "ABC")
    ]


def test_several_files_name_the_file_of_a_bad_row(tmp_path):
    as_table().to_csv(tmp_path / "good.csv", index=False)
    datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}]).to_csv(
        tmp_path / "bad.csv", index=False
    )
    with pytest.raises(DataError, match="bad.csv row 2"):
        read_rows(f"{tmp_path / 'good.csv'},{tmp_path / 'bad.csv'}")


def test_missing_file_glob_and_unknown_extension_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "nope.parquet")
    with pytest.raises(DataError, match="matches no file"):
        read_rows(f"{tmp_path}/*.parquet")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unknown extension"):
        read_rows(f"{tmp_path}/notes.*")


def test_eval_split_holds_out_a_seeded_disjoint_share_and_stays_lazy(tmp_path):
    datasets.Dataset.from_list([{"text": f"row {i}"} for i in range(50)]).to_parquet(tmp_path / "t.parquet")
    rows = read_rows(tmp_path / "t.parquet")
    train, held = split_train_eval(rows, 0.1, seed=3)
    assert isinstance(train, DatasetRows) and (len(train), len(held)) == (45, 5)
    seen = [r.data["text"] for r in train] + [r.data["text"] for r in held]
    assert sorted(seen) == sorted(f"row {i}" for i in range(50))
    assert [r.data["text"] for r in split_train_eval(rows, 0.1, seed=3)[1]] == [r.data["text"] for r in held]


def test_large_file_is_scanned_with_bounded_python_memory(tmp_path):
    """20 MB of text rows: validating them keeps far less than the file in Python objects (rows stay in the
    memory-mapped Arrow table and are materialized one at a time)."""
    text = "x" * 1000
    datasets.Dataset.from_dict({"text": [f"{i} {text}" for i in range(20_000)]}).to_parquet(tmp_path / "big.parquet")
    tracemalloc.start()
    try:
        rows = read_rows(tmp_path / "big.parquet")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == 20_000 and rows[19_999].data["text"].startswith("19999 ")
    assert peak < 8e6, f"scanning 20 MB of rows peaked at {peak / 1e6:.1f} MB of Python memory"


@pytest.fixture
def dataset_hub(tmp_path, monkeypatch):
    """The one loopback Hub of the tests (`hub_server.FakeHub`) with dataset repos: CSV with a README that names
    configs and splits, Parquet files (served as LFS files: over the hub's 1 KiB threshold) and JSONL files laid
    out as ``data/{split}-*.ext`` (the layout ``datasets`` detects without a README)."""
    from hub_server import FakeHub
    from huggingface_hub import constants

    readme = ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: train.csv\n"
              "  - split: test\n    path: test.csv\n"
              "- config_name: alpaca\n  data_files: alpaca.csv\n---\n")  # fmt: skip
    datasets.Dataset.from_list(ROWS * 20).to_parquet(tmp_path / "p.parquet")
    with FakeHub() as hub:
        hub.add_repo("org/rows", {"README.md": readme, "train.csv": "prompt,completion\nup abc,ABC\nup bad,BAD\n",
                                  "test.csv": "prompt,completion\nup fed,FED\n",
                                  "alpaca.csv": "instruction,output\nup,UP\n"}, repo_type="dataset")  # fmt: skip
        hub.add_repo("org/pq", {"data/train-00000.parquet": (tmp_path / "p.parquet").read_bytes()}, repo_type="dataset")
        jsonl = "".join(json.dumps(r) + "\n" for r in ROWS)
        hub.add_repo("org/lines", {"data/train-0.jsonl": jsonl, "data/test-0.jsonl": jsonl[: jsonl.index("\n") + 1]},
                     repo_type="dataset")  # fmt: skip
        monkeypatch.setenv("HF_ENDPOINT", hub.url)  # huggingface_hub read it at import: patch what it derived
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))  # not ~/.cache: fresh downloads
        yield hub


def test_hub_dataset_id_with_config_and_split_loads_from_a_loopback_hub(dataset_hub):
    assert pairs(read_rows("org/rows")) == [
        ("prompt_completion", "up abc", "ABC"),
        ("prompt_completion", "up bad", "BAD"),
    ]
    assert pairs(read_rows("org/rows", split="test")) == [("prompt_completion", "up fed", "FED")]
    assert pairs(read_rows("org/rows", config="alpaca")) == [("prompt_completion", "up", "UP")]
    assert any(path.startswith("/datasets/org/rows/resolve/") for _, path in dataset_hub.requests)
    with pytest.raises(DataError, match="could not load hub dataset 'org/missing'"):
        read_rows("org/missing")


def test_hub_parquet_and_jsonl_repos_without_a_readme_load_by_their_file_layout(dataset_hub):
    expected = [("prompt_completion", r["prompt"], r["completion"]) for r in ROWS]
    assert pairs(read_rows("org/pq")) == expected * 20
    assert pairs(read_rows("org/lines")) == expected
    assert pairs(read_rows("org/lines", split="test")) == expected[:1]
    got = [p for m, p in dataset_hub.file_requests() if m == "GET" and p.startswith("/datasets/org/pq/resolve/")]
    assert any(p.endswith("/data/train-00000.parquet") for p in got), got
