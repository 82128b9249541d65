"""meld.read_text: the encodings MELD and user CSVs arrive in, and the ones it must refuse out loud."""

import pytest

import meld

HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
MELD = HEADER + (
    '1,"Oh my God, he’s lost it.",Phoebe,sadness,negative,0,0,4,7,"00:20:57,256","00:21:00,049"\n'
    "2,You’re at the café…,Monica,surprise,positive,0,1,4,7,\"00:21:01,927\",\"00:21:03,261\"\n"
    '3,"He said ""no"",\nthen left",Ross,anger,negative,0,2,4,7,"00:21:04,000","00:21:05,500"\n'
)
CP1252_ROW = '4,You’re late,The Interviewer,neutral,neutral,1,0,4,7,"00:01:00,000","00:01:02,000"\n'
UTF16 = {"le-bom": b"\xff\xfe" + MELD.encode("utf-16-le"), "le": MELD.encode("utf-16-le"),
         "be-bom": b"\xfe\xff" + MELD.encode("utf-16-be"), "be": MELD.encode("utf-16-be")}


def write(tmp_path, raw, name="train_sent_emo.csv"):
    path = tmp_path / name
    path.write_bytes(raw)
    return path


@pytest.fixture
def expected(tmp_path):
    rows = meld.read_meld_csv(write(tmp_path, MELD.encode(), "original.csv"), "train")
    assert [r.text for r in rows] == ["Oh my God, he’s lost it.", "You’re at the café…", 'He said "no",\nthen left']
    return rows


@pytest.mark.parametrize("variant", UTF16)
def test_utf16_with_or_without_bom_parses_like_utf8(tmp_path, expected, variant):
    path = write(tmp_path, UTF16[variant])
    assert meld.read_text(path) == MELD
    assert meld.read_meld_csv(path, "train") == expected


def test_utf8_file_with_one_cp1252_row_keeps_every_row_right(tmp_path, expected):
    path = write(tmp_path, MELD.encode() + CP1252_ROW.encode("cp1252"))
    assert meld.read_text(path) == MELD + CP1252_ROW  # no "â€™": the UTF-8 rows are untouched
    rows = meld.read_meld_csv(path, "train")
    assert rows[:3] == expected and rows[3].text == "You’re late"


@pytest.mark.parametrize("encoding", ["cp1252", "utf-8-sig"])
def test_whole_cp1252_and_utf8_bom_files(tmp_path, expected, encoding):
    path = write(tmp_path, (MELD + CP1252_ROW).encode(encoding))
    assert meld.read_text(path) == MELD + CP1252_ROW  # the BOM is dropped
    assert meld.read_meld_csv(path, "train")[:3] == expected


@pytest.mark.parametrize("ending", ["\r\n", "\r"])
def test_line_endings_are_kept(tmp_path, expected, ending):
    text = MELD.replace("\n", ending)
    path = write(tmp_path, text.encode() + CP1252_ROW.replace("\n", ending).encode("cp1252"))
    assert meld.read_text(path) == text + CP1252_ROW.replace("\n", ending)
    rows = meld.read_meld_csv(path, "train")
    assert rows[:2] == expected[:2] and rows[2].text == f'He said "no",{ending}then left'


def test_line_neither_utf8_nor_cp1252_is_refused_with_its_line(tmp_path):
    bad = b'5,Caf\xe9 \x81,Ross,joy,positive,1,1,4,7,"00:01:03,000","00:01:04,000"\n'
    path = write(tmp_path, MELD.encode() + CP1252_ROW.encode("cp1252") + bad)
    for read in (meld.read_text, lambda p: meld.read_meld_csv(p, "train")):
        with pytest.raises(ValueError) as error:
            read(path)
        message = str(error.value)
        # header 1, rows 2-3, the quoted newline makes row 3 lines 4-5, the cp1252 row 6: the bad one is 7
        assert message == f"{path}, line 7: neither UTF-8 nor cp1252 (byte 0x81 at column 8); save the file as UTF-8"
        assert "\n" not in message


@pytest.mark.parametrize("raw", [MELD.encode("utf-32"), MELD.encode("utf-32-le"), UTF16["le-bom"][:-1]],
                         ids=["utf-32", "utf-32-no-bom", "truncated-utf-16"])
def test_utf32_and_broken_utf16_are_refused_in_one_line(tmp_path, raw):
    path = write(tmp_path, raw)
    with pytest.raises(ValueError, match="save the file as UTF-8") as error:
        meld.read_meld_csv(path, "train")
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_utf16_file_missing_a_column_names_the_real_columns(tmp_path):
    path = write(tmp_path, MELD.replace(",Sentiment", "").encode("utf-16"))
    with pytest.raises(ValueError) as error:
        meld.read_meld_csv(path, "train")
    message = str(error.value)
    assert message.startswith(f"{path}: missing column(s) ['Sentiment']; found ['Sr No.', 'Utterance',")
    assert "\n" not in message and "\x00" not in message


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be"])
def test_utf16_manifest(tmp_path, codec):
    path = write(tmp_path, "path,label,text\r\nclips/a.mp4,joy,You’re here\r\nb.wav,anger,café\r\n".encode(codec),
                 "clips.csv")
    rows = meld.read_manifest_csv(path)
    assert [(r["path"], r["label"], r["text"]) for r in rows] == [
        (str(tmp_path.resolve() / "clips" / "a.mp4"), "joy", "You’re here"),
        (str(tmp_path.resolve() / "b.wav"), "anger", "café")]


@pytest.mark.parametrize("raw", [*UTF16.values(), (MELD + CP1252_ROW).encode("cp1252"),
                                 MELD.encode("utf-8-sig") + CP1252_ROW.encode("cp1252")])
def test_text_written_as_utf8_reads_back_the_same(tmp_path, raw):
    """prepare copies read_text's result into the cache as UTF-8: that copy must read back unchanged."""
    text = meld.read_text(write(tmp_path, raw))
    copy = tmp_path / "copy.csv"
    copy.write_text(text, encoding="utf-8", newline="")
    assert meld.read_text(copy) == text
    assert meld.read_meld_csv(copy, "train") == meld.read_meld_csv(tmp_path / "train_sent_emo.csv", "train")
