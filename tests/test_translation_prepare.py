"""The IWSLT14 preparation on a miniature of the WIT3 archive: fairseq's prepare-iwslt14.sh steps
(tag filtering, Moses tokenization, cleaning, lowercasing, the every-23rd-line valid split, the test
composition, joint BPE) into a folder the data module reads; missing downloads are one clear error."""
from __future__ import annotations

import tarfile

import pytest

from tasks.common.errors import DataError
from tasks.translation.data import TranslationDataModule
from tasks.translation.prepare import clean_corpus, prepare, train_tags_lines, xml_segments

TEST_NAMES = ["IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
              "IWSLT14.TED.tst2012"]


def make_wit3(root, n=60):
    d = root / "de-en"
    d.mkdir(parents=True)
    de, en = ["<url>http://www.ted.com/talks/x</url>", "<talkid>1</talkid>", "<keywords>talks</keywords>",
              "<title>Der Titel</title>"], ["<url>http://www.ted.com/talks/x</url>", "<talkid>1</talkid>",
                                            "<keywords>talks</keywords>", "<title>The Title</title>"]
    for i in range(n):
        de.append(f"Das Haus Nummer {i} ist groß, sagte sie.")
        en.append(f"The house number {i} is big, she said.")
    de.append("Ja.")  # the ratio rule drops this pair (1 token vs 8)
    en.append("Yes , this is a very long answer here .")
    (d / "train.tags.de-en.de").write_text("\n".join(de) + "\n")
    (d / "train.tags.de-en.en").write_text("\n".join(en) + "\n")
    for k, name in enumerate(TEST_NAMES):
        for lang, text in (("de", "Hallo Welt"), ("en", "Hello world")):
            segs = "\n".join(f'<seg id="{j}"> {text} {k}-{j} </seg>' for j in range(1, 3))
            (d / f"{name}.de-en.{lang}.xml").write_text(f"<mteval>\n<doc>\n{segs}\n</doc>\n</mteval>\n")
    return d


def test_steps_follow_prepare_iwslt14():
    text = "<url>u</url>\n<title>T</title>\nSatz\n<description>D</description>\n"
    assert train_tags_lines(text) == ["T", "Satz", "D"]
    assert xml_segments('<seg id="3">  It\u2019s here </seg>\n<p>x</p>\n') == ["It's here"]
    src, tgt = clean_corpus(["a b c", "a", "a | b", ""], ["x y z", "x y z", "x  y", "x"], 1.5, 1, 175)
    assert (src, tgt) == (["a b c", "a b"], ["x y z", "x y"])


@pytest.mark.parametrize("archive", [False, True])
def test_prepare_iwslt14_de_en(tmp_path, archive, caplog):
    raw = tmp_path / "raw"
    d = make_wit3(raw)
    if archive:
        with tarfile.open(raw / "de-en.tgz", "w:gz") as tar:
            tar.add(d, arcname="de-en")
        import shutil

        shutil.rmtree(d)
    out = prepare("iwslt14_de_en", raw, tmp_path / "bin", bpe_merges=30)
    train = (out / "train.de").read_text().splitlines()
    valid = (out / "valid.en").read_text().splitlines()
    test = (out / "test.en").read_text().splitlines()
    # 61 lines survive the tag filter (title kept, 3 tag lines dropped) minus 1 ratio-dropped = 61; every 23rd is valid
    assert len(train) + len(valid) == 61 and len(valid) == 2
    assert valid[0].replace("@@ ", "") == "the house number 21 is big , she said ."  # line 23 of the cleaned text
    assert all(line == line.lower() for line in train + valid + test)
    assert any("@@" in line for line in train)
    assert [t.replace("@@ ", "").split()[-1] for t in test] == [f"{k}-{j}" for k in range(5) for j in (1, 2)]
    dm = TranslationDataModule(str(out), "de", "en", num_workers=0)
    dm.check("validate")
    assert len(dm.datasets["test"]) == 10 and (out / "code").is_file()
    with pytest.raises(DataError, match="already holds binarized data"):
        prepare("iwslt14_de_en", raw, out)


def test_missing_download_says_what_and_where(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match=r"train\.tags\.de-en\.de not found under .*expects de-en\.tgz from the WIT3"):
        prepare("iwslt14_de_en", tmp_path / "raw", tmp_path / "out")
    with pytest.raises(DataError, match="tst2012.en not found.*Stanford"):
        (tmp_path / "raw" / "train.en").write_text("a\n")
        (tmp_path / "raw" / "train.vi").write_text("b\n")
        prepare("iwslt15_en_vi", tmp_path / "raw", tmp_path / "out")


PO = r'''msgid ""
msgstr ""
"Language: de\n"

#: a.py:1
msgid "Save"
msgstr "Sichern"

#, fuzzy
msgid "Delete"
msgstr "Entfernen"

msgid ""
"Enter a "
"\"valid\" value."
msgstr "Bitte einen \"gültigen\" Wert eingeben."

msgid "%(n)s item"
msgid_plural "%(n)s items"
msgstr[0] "%(n)s Eintrag"
msgstr[1] "%(n)s Einträge"

msgid "Untranslated"
msgstr ""
'''


def test_po_catalog_parser():
    from tasks.translation.django_corpus import parse_po

    assert parse_po(PO) == [("Save", "Sichern"), ('Enter a "valid" value.', 'Bitte einen "gültigen" Wert eingeben.'),
                            ("%(n)s item", "%(n)s Eintrag")]


def test_django_catalogs_are_a_real_parallel_corpus(tmp_path):
    pytest.importorskip("django")
    from tasks.translation.demo import prepare_demo

    out = prepare_demo(tmp_path / "dj", {"source": "django", "lang": "de", "bpe_merges": 200}, "de", "en")
    dm = TranslationDataModule(str(out), "de", "en", num_workers=0)
    dm.check("fit")
    dm.check("validate")
    sizes = {k: len(v) for k, v in dm.datasets.items()}
    assert sizes["train"] > 500 and sizes["valid"] > 50 and sizes["test"] > 50
    text = dm.tgt_dict.string(dm.datasets["train"].tgt[1])  # pair 1 of the catalogs: Arabic -> Arabisch
    assert text == "arabic" and dm.src_dict.string(dm.datasets["train"].src[1]) == "arabisch"


def test_prepare_wmt14_and_stanford_layouts(tmp_path):
    """WMT14 En-De (cased, aggressive dash split, joined dictionary, newstest2013/2014) and IWSLT15 En-Vi
    (Stanford's tokenized release as it is) on miniature downloads."""
    raw = tmp_path / "wmt"
    (raw / "training").mkdir(parents=True)
    en = [f"The well-known House {i} is big." for i in range(30)]
    de = [f"Das bekannte Haus {i} ist groß." for i in range(30)]
    for corpus in ("europarl-v7.de-en", "commoncrawl.de-en", "news-commentary-v9.de-en"):
        (raw / "training" / f"{corpus}.en").write_text("\n".join(en) + "\n")
        (raw / "training" / f"{corpus}.de").write_text("\n".join(de) + "\n")
    (raw / "newstest2013.en").write_text("A small test.\nAnother one.\n")
    (raw / "newstest2013.de").write_text("Ein kleiner Test.\nNoch einer.\n")
    for role, lang, text in (("src", "en", "Hello World"), ("ref", "de", "Hallo Welt")):
        segs = "\n".join(f'<seg id="{i}">{text} {i}</seg>' for i in range(1, 4))
        (raw / f"newstest2014-deen-{role}.{lang}.sgm").write_text(f"<srcset>\n<doc>\n{segs}\n</doc>\n</srcset>\n")
    out = prepare("wmt14_en_de", raw, tmp_path / "wmt_bin", bpe_merges=20)
    assert (out / "dict.en.txt").read_text() == (out / "dict.de.txt").read_text()  # joined
    train = (out / "train.en").read_text().replace("@@ ", "").splitlines()
    assert len(train) == 90 and train[0] == "The well @-@ known House 0 is big ."  # cased, dash split
    assert (out / "test.de").read_text().replace("@@ ", "").splitlines() == [f"Hallo Welt {i}" for i in (1, 2, 3)]
    dm = TranslationDataModule(str(out), "en", "de", joined_dictionary=True, num_workers=0)
    dm.check("validate")
    assert len(dm.datasets["valid"]) == 2

    raw = tmp_path / "envi"
    raw.mkdir()
    for name, n in (("train", 20), ("tst2012", 3), ("tst2013", 4)):
        (raw / f"{name}.en").write_text("".join(f"Hello there , friend {i}\n" for i in range(n)))
        (raw / f"{name}.vi").write_text("".join(f"Xin chào bạn {i}\n" for i in range(n)))
    out = prepare("iwslt15_en_vi", raw, tmp_path / "envi_bin", bpe_merges=0)
    assert (out / "test.en").read_text().splitlines()[0] == "Hello there , friend 0"  # as released: cased
    dm = TranslationDataModule(str(out), "en", "vi", num_workers=0)
    dm.check("validate")
    assert (len(dm.datasets["valid"]), len(dm.datasets["test"])) == (3, 4)


def test_misaligned_or_empty_text_is_refused(tmp_path):
    from tasks.translation.binarize import write_data_bin

    with pytest.raises(DataError, match=r"train\.de has 2 lines but train\.en has 1: the parallel files are misaligned"):
        write_data_bin(tmp_path, {"train": (["a b", "c"], ["x"])}, "de", "en")
    with pytest.raises(DataError, match=r"valid\.en line 2 is empty"):
        write_data_bin(tmp_path, {"train": (["a"], ["x"]), "valid": (["a", "b"], ["x", " "])}, "de", "en")
    assert not list(tmp_path.glob("*.idx"))  # nothing written before the check
