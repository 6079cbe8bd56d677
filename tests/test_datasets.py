"""Readers (verl parquet, JSONL, TFDS, K&K generator), multi-host sharding, resumable iterator."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlcsd_jax.data import (
    BatchIterator,
    Record,
    build_kk_tfds,
    kk_records,
    read_jsonl,
    read_records,
    read_tfds,
    read_verl_parquet,
)
from rlcsd_jax.data.readers import parse_kk_source

BOXED = "Please reason step by step, and put your final answer within \\boxed{}."


def _verl_rows():
    return [
        {  # extra_info.problem present: preferred over the prompt text
            "data_source": "deepmath_filtered_level5_7",
            "prompt": [{"role": "user", "content": f"Problem: What is 2+2?\n\n{BOXED}"}],
            "reward_model": {"ground_truth": "4", "style": "rule"},
            "extra_info": {"index": 17, "problem": "What is 2+2?", "solution": "2+2=4."},
        },
        {  # no extra_info.problem: the user message with its legacy wrapper removed
            "data_source": "aime24",
            "prompt": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": f"Problem: Find x.\n\n{BOXED}"},
            ],
            "reward_model": {"ground_truth": "12", "style": "rule"},
            "extra_info": {"index": None, "problem": None, "solution": None},
        },
        {  # the reference's legacy DAPO form (both instruction sentences, then the problem)
            "data_source": "amc23",
            "prompt": [
                {
                    "role": "user",
                    "content": "Solve the following math problem step by step. The last line of your "
                    "response should be of the form Answer: $Answer (without quotes) where "
                    "$Answer is the answer to the problem.\n\nRemember to put your answer on its "
                    'own line after "Answer:".\n\nCompute 3!.',
                }
            ],
            "reward_model": {"ground_truth": "6", "style": "rule"},
            "extra_info": {"index": 3, "problem": None, "solution": None},
        },
    ]


def test_verl_parquet_round_trip(tmp_path):
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(_verl_rows()), path)
    assert read_verl_parquet(path) == [
        Record("What is 2+2?", "4", "deepmath_filtered_level5_7", 17, "2+2=4."),
        Record("Find x.", "12", "aime24", 1, None),  # index defaults to the row number
        Record("Compute 3!.", "6", "amc23", 3, None),
    ]
    assert read_records(path) == read_verl_parquet(path)


@pytest.mark.parametrize(
    "row_number,mutate,field",
    [
        (1, lambda r: r["reward_model"].update(ground_truth=None), "reward_model.ground_truth"),
        (2, lambda r: r.update(data_source=None), "data_source"),
        (0, lambda r: (r["extra_info"].update(problem=None), r.update(prompt=[])), "prompt"),
        (
            2,
            lambda r: (
                r["extra_info"].update(problem=""),
                r.update(prompt=[{"role": "user", "content": ""}, {"role": "system"}]),
            ),
            "prompt",
        ),
    ],
)
def test_verl_parquet_malformed_rows_name_file_row_field(tmp_path, row_number, mutate, field):
    rows = _verl_rows()
    mutate(rows[row_number])
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError) as info:
        read_verl_parquet(path)
    message = str(info.value)
    assert path in message and f"row {row_number}" in message and f"'{field}'" in message


KK_QUIZ = ("A very special island is inhabited only by knights and knaves. Knights always tell "
           "the truth, and knaves always lie. You meet 2 inhabitants: Zoey, and Ella. Zoey said "
           'that "Ella is a knave." Ella said, "Zoey is a knight." So who is a knight and who is '
           "a knave?")


def _row(problem, prompt, source="kk_4to8"):
    return {"data_source": source, "prompt": prompt,
            "reward_model": {"ground_truth": "Zoey is a knight, Ella is a knave"},
            "extra_info": {"index": 0, "problem": problem, "solution": None}}


@pytest.mark.parametrize("problem,prompt,expected", [
    # extra_info.problem is kept as stored (the prompt builders strip it), wrapped or not
    (f"{KK_QUIZ}\n\n{BOXED}", [{"role": "user", "content": "ignored"}], f"{KK_QUIZ}\n\n{BOXED}"),
    (KK_QUIZ, [{"role": "user", "content": "ignored"}], KK_QUIZ),
    # empty or missing: the prompt's text, cleaned
    ("", [{"role": "user", "content": f"Problem: {KK_QUIZ}\n\n{BOXED}"}], KK_QUIZ),
    (None, [{"role": "user", "content": f"{KK_QUIZ}\n\n{BOXED}"}], KK_QUIZ),
    # the user messages' text, joined by newlines (a system message is left out)
    ("", [{"role": "system", "content": "sys"}, {"role": "user", "content": "Part 1."},
          {"role": "user", "content": f"Part 2.\n\n{BOXED}"}],
     "Part 1.\nPart 2."),
    # no user text: every message's text
    ("", [{"role": "system", "content": f"Find x.\n\n{BOXED}"}], "Find x."),
])
def test_problem_text_and_its_fallback_to_the_prompt(tmp_path, problem, prompt, expected):
    path = str(tmp_path / "rows.parquet")
    pq.write_table(pa.Table.from_pylist([_row(problem, prompt)]), path)
    assert read_verl_parquet(path)[0].problem == expected


def test_multimodal_message_text_segments():
    """Content given as segments (verl's multimodal form): the text segments, space-joined."""
    from rlcsd_jax.data.readers import verl_row_to_record

    prompt = [{"role": "user", "content": [{"type": "text", "text": "Find"},
                                           {"type": "image", "image": "..."},
                                           {"type": "text", "text": f"x.\n\n{BOXED}"}]}]
    assert verl_row_to_record(_row("", prompt), "here", 0).problem == "Find x."


FIELD_MAP = {
    "problem": "question",
    "ground_truth": "answer.final",
    "solution": "answer.cot",
    "index": "id",
}


def test_jsonl_round_trip_with_dotted_field_map(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [
        {"question": "1+1?", "answer": {"final": "2", "cot": "One and one."}, "id": "a"},
        {"question": "2*3?", "answer": {"final": 6}, "id": 7},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = read_jsonl(str(path), FIELD_MAP, data_source="toy")
    assert records == [
        Record("1+1?", "2", "toy", "a", "One and one."),
        Record("2*3?", "6", "toy", 7, None),
    ]
    assert read_records(str(path), field_map=FIELD_MAP, data_source="toy") == records


@pytest.mark.parametrize(
    "lines,row,line,needle",
    [
        (['{"question": "q", "answer": {"cot": "c"}}'], 0, 1, "'answer.final' is missing"),
        (
            [
                '{"question": "q", "answer": {"final": "1"}}',
                '{"question": ["x"], "answer": {"final": "2"}}',
            ],
            1,
            2,
            "'question' must be a string",
        ),
        (['{"question": "q", "answer": {"final": "1"}}', "", "{not json"], 1, 3, "not valid JSON"),
        (["[1, 2]"], 0, 1, "expected a JSON object"),
    ],
)
def test_jsonl_malformed_rows_name_file_row_field(tmp_path, lines, row, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as info:
        read_jsonl(str(path), FIELD_MAP, data_source="toy")
    message = str(info.value)
    assert str(path) in message and f"row {row} (line {line})" in message and needle in message


def test_field_map_errors_are_explicit(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "x", "a": "y"}\n')
    with pytest.raises(ValueError, match="unknown record fields"):
        read_jsonl(str(path), {"problem": "q", "ground_truth": "a", "answer": "a"}, data_source="s")
    with pytest.raises(ValueError, match="data_source"):
        read_jsonl(str(path), {"problem": "q", "ground_truth": "a"})


def test_kk_generator_reader():
    assert parse_kk_source("kk_4to8") == (4, 8, "train")
    assert parse_kk_source("kk_4to8_test") == (4, 8, "test")
    assert parse_kk_source("kk_9") == (9, 9, "test")
    train = kk_records("kk_4to8", 10)
    assert train == kk_records("kk_4to8", 10)  # deterministic
    assert [r.index for r in train] == list(range(10))
    assert [r.ground_truth.count(" is a ") for r in train] == [4, 5, 6, 7, 8] * 2
    assert {r.data_source for r in train} == {"kk_4to8"}
    test = kk_records("kk_4to8_test", 10)
    assert not {r.problem for r in test} & {r.problem for r in train}
    assert kk_records("kk_4to8", 3, seed=1) != kk_records("kk_4to8", 3)
    assert all(r.ground_truth.count(" is a ") == 11 for r in read_records("kk_11", num_examples=3))
    with pytest.raises(ValueError, match="K&K"):
        kk_records("kk_x", 1)


def test_tfds_build_and_read_round_trip(tmp_path):
    data_dir = str(tmp_path / "tfds")
    name = build_kk_tfds(data_dir, "kk_4to8", train_size=5, test_size=3)
    assert read_tfds(name, "train", data_dir) == kk_records("kk_4to8", 5)
    assert read_tfds(name, "test", data_dir) == kk_records("kk_4to8_test", 3)
    # Any prepared dataset can be read with a field mapping and a constant data source.
    mapped = read_tfds(
        name,
        "train",
        data_dir,
        field_map={"problem": "problem", "ground_truth": "ground_truth"},
        data_source="custom",
    )
    assert [(r.data_source, r.index, r.solution) for r in mapped] == [
        ("custom", i, None) for i in range(5)
    ]
    with pytest.raises(ValueError, match="no split"):
        read_tfds(name, "validation", data_dir)
    with pytest.raises(FileNotFoundError, match="not prepared"):
        read_tfds("knights_knaves/kk_9", "test", data_dir)


def _records(n):
    return [Record(f"p{i}", str(i), "toy", i) for i in range(n)]


@pytest.mark.parametrize("process_count", [1, 2, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sharding_is_disjoint_and_covering(process_count, shuffle):
    records = _records(48)
    shards = []
    for p in range(process_count):
        it = BatchIterator(
            records,
            batch_size=3,
            seed=11,
            shuffle=shuffle,
            num_epochs=1,
            process_index=p,
            process_count=process_count,
        )
        batches = list(it)
        assert all(len(b) == 3 for b in batches)
        shards.append([r.index for b in batches for r in b])
    assert len({len(s) for s in shards}) == 1  # every host runs the same number of steps
    seen = [i for s in shards for i in s]
    assert sorted(seen) == list(range(48))  # disjoint and covering


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_drop_last_cuts_the_epoch_to_whole_global_batches(process_count):
    records = _records(50)
    seen = []
    for p in range(process_count):
        it = BatchIterator(
            records,
            batch_size=4,
            shuffle=True,
            num_epochs=1,
            process_index=p,
            process_count=process_count,
        )
        seen += [r.index for b in it for r in b]
    global_batch = 4 * process_count
    assert len(seen) == len(set(seen)) == 50 // global_batch * global_batch


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_global_batch_does_not_depend_on_the_process_count(process_count, drop_last):
    # Multi-host training relies on it: the processes' batches concatenated in process order
    # are the single-process batch, so a run's data (and its results) do not change with the
    # number of hosts.
    records = _records(50)
    kw = dict(seed=3, shuffle=True, num_epochs=1, drop_last=drop_last)
    single = [[r.index for r in b] for b in BatchIterator(records, 4 * process_count,
                                                          process_index=0, process_count=1, **kw)]
    per_process = [[[r.index for r in b] for b in BatchIterator(
        records, 4, process_index=p, process_count=process_count, **kw)]
        for p in range(process_count)]
    joined = [sum((per_process[p][i] for p in range(process_count)
                   if i < len(per_process[p])), []) for i in range(len(per_process[0]))]
    assert joined == single


def test_shuffle_is_deterministic_per_seed_and_epoch():
    records = _records(20)

    def epochs(seed):
        it = BatchIterator(
            records, 5, seed=seed, shuffle=True, num_epochs=2, process_index=0, process_count=1
        )
        return [r.index for b in it for r in b]

    a, b = epochs(3), epochs(3)
    assert a == b
    assert a[:20] != a[20:]  # a new order each epoch
    assert sorted(a[:20]) == sorted(a[20:]) == list(range(20))
    assert epochs(4) != a
    unshuffled = BatchIterator(records, 5, num_epochs=1, process_index=0, process_count=1)
    assert [r.index for b in unshuffled for r in b] == list(range(20))  # reference: file order


def test_state_save_restore_resumes_at_the_same_record():
    records = _records(30)
    kwargs = dict(batch_size=4, seed=5, shuffle=True, process_index=1, process_count=2)
    it = BatchIterator(records, **kwargs)
    for _ in range(5):  # crosses the epoch boundary (3 batches per epoch per process)
        next(it)
    state = it.get_state()
    assert state == {"epoch": 1, "batch": 2}
    assert json.loads(json.dumps(state)) == state  # plain ints
    expected = [next(it) for _ in range(6)]
    resumed = BatchIterator(records, **kwargs)
    resumed.set_state(state)
    assert [next(resumed) for _ in range(6)] == expected
    with pytest.raises(ValueError, match="iterator state"):
        resumed.set_state({"epoch": 1})


def test_iterator_defaults_to_jax_process_and_validates():
    it = BatchIterator(_records(8), 2)
    assert (it.process_index, it.process_count) == (0, 1)
    with pytest.raises(ValueError, match="process_index"):
        BatchIterator(_records(8), 2, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="global batch"):
        BatchIterator(_records(3), 2, process_index=0, process_count=2)
