import pytest
import torch

from sign_sae.corpus import SPLIT_PLAYS, SPLITS, load_texts, strip_markdown, tokenize


@pytest.fixture(scope="module")
def splits():
    return [load_texts(split=s) for s in SPLITS]


def test_three_splits_by_play_are_disjoint_and_non_empty(splits):
    train, validation, test = splits
    assert len(validation) == len(test) == 3 and len(train) == 32
    titles = [{text.splitlines()[0] for text in split} for split in splits]
    assert titles[1] == {"Macbeth", "Twelfth Night", "Henry V"}
    assert titles[2] == {"Richard III", "Titus Andronicus", "Two Gentlemen of Verona"}
    for i in range(3):
        for j in range(i + 1, 3):
            assert not titles[i] & titles[j]
            assert not set(splits[i]) & set(splits[j])
    assert not set(SPLIT_PLAYS["validation"]) & set(SPLIT_PLAYS["test"])
    assert all(len(text) > 50_000 for split in splits for text in split)
    # Lines that only one held-out split contains reach neither training nor the other split.
    for line, home in (
        ("Fair is foul, and foul is fair", 1),
        ("If music be the food of love", 1),
        ("Now is the winter of our discontent", 2),
    ):
        for i, split in enumerate(splits):
            assert any(line in text for text in split) == (i == home), (line, i)


def test_no_token_row_is_in_two_splits(model):
    rows = [
        {tuple(r.tolist()) for r in tokenize(model, load_texts(split=s), context_size=32)}
        for s in SPLITS
    ]
    assert all(len(r) > 1000 for r in rows)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not rows[i] & rows[j], (SPLITS[i], SPLITS[j])


def test_loading_is_deterministic(splits):
    assert load_texts(split="validation") == splits[1]
    assert load_texts(split="test") == splits[2]
    assert load_texts(split="train", max_docs=2) == splits[0][:2]


def test_markdown_is_stripped(splits):
    for text in [t for split in splits for t in split]:
        assert "**" not in text and "_" not in text and "\\[" not in text
        assert not any(line.startswith("#") for line in text.splitlines())
        assert "  \n" not in text


def test_strip_markdown_keeps_the_words():
    raw = "## SCENE II. A camp.\n\n_Alarum within_\n\n**DUNCAN**  \nWhat bloody man is that?  \n"
    assert (
        strip_markdown(raw)
        == "SCENE II. A camp.\n\nAlarum within\n\nDUNCAN\nWhat bloody man is that?"
    )
    assert strip_markdown("__\\[Awaking]_  ") == "[Awaking]"


@pytest.mark.parametrize(
    ("source", "split", "fix"),
    [
        ("wikipedia", "train", "shakespeare"),
        ("shakespeare", "eval", "'validation'"),
        ("hf:", "train", "hf:<dataset>"),
        ("hf:a:b:c", "train", "hf:<dataset>:<config>"),
        ("hf:owner/data", "held-out", "'test'"),
    ],
)
def test_bad_source_or_split_names_the_fix(source, split, fix):
    with pytest.raises(ValueError, match="Unknown|Bad") as err:
        load_texts(source, split)
    assert fix in str(err.value)


def test_tokenize_rows_start_with_bos(model, eval_tokens):
    bos = model.tokenizer.bos_token_id
    assert model.tokenizer.bos_token == "<|im_start|>"
    assert eval_tokens.shape == (8, 64) and eval_tokens.dtype == torch.long
    assert (eval_tokens[:, 0] == bos).all()
    assert not (eval_tokens[:, 1:] == bos).any()
    text = model.tokenizer.decode(eval_tokens[0, 1:])
    assert load_texts(split="validation")[0].startswith(text)


def test_tokenize_without_bos_is_the_plain_token_stream(model):
    texts = ["Now is the winter of our discontent", "Made glorious summer by this sun of York"]
    rows = tokenize(model, texts, context_size=4, prepend_bos=False)
    ids = model.tokenizer(texts[0], add_special_tokens=False).input_ids
    ids += [model.tokenizer.eos_token_id]
    ids += model.tokenizer(texts[1], add_special_tokens=False).input_ids
    assert rows.shape == (len(ids) // 4, 4)
    assert rows.flatten().tolist() == ids[: rows.numel()]


def test_tokenize_stops_at_max_tokens(model):
    rows = tokenize(model, load_texts(split="train"), context_size=32, max_tokens=100)
    assert rows.shape == (3, 32)


def test_tokenize_errors_are_clear(model):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tokenize(model, ["text"], context_size=model.cfg.n_ctx + 1)
    with pytest.raises(ValueError, match="No text"):
        tokenize(model, ["", "  "])
    with pytest.raises(ValueError, match="too few for one row"):
        tokenize(model, ["A few words."], context_size=64)
    with pytest.raises(ValueError, match="less than one row"):
        tokenize(model, ["A few words."], context_size=64, max_tokens=10)
