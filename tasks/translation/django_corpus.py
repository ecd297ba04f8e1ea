"""Real parallel text that ships inside a registry package: Django's gettext catalogs.

``django/conf/locale/<lang>/LC_MESSAGES/django.po`` and the contrib apps' catalogs hold human translations
of Django's English UI strings (BSD licence), about a thousand per language. They are read from the
installed package (a test-only dependency), never copied into this repository. Entries without a
translation, fuzzy entries and the header are skipped; for plural entries the singular pair is used; a
message id seen in several catalogs is kept once.

The corpus is then prepared like IWSLT (Moses tokenization, lowercasing, joint BPE) and split
deterministically: pair i goes to valid when i % 10 == 3, to test when i % 10 == 7, else to train.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tasks.common.errors import DataError


def _unquote(chunks: list[str]) -> str:
    return "".join(ast.literal_eval(c) for c in chunks)


def parse_po(text: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) of every translated, non-fuzzy entry of a .po file (singular form for plurals)."""
    out = []
    entry: dict[str, list[str]] = {}
    key: str | None = None
    fuzzy = False

    def flush() -> None:
        msgid, msgstr = _unquote(entry.get("msgid", [])), _unquote(entry.get("msgstr", entry.get("msgstr[0]", [])))
        if msgid and msgstr and not fuzzy:
            out.append((msgid, msgstr))

    for line in text.split("\n") + [""]:
        line = line.strip()
        if not line:
            if entry:
                flush()
            entry, key, fuzzy = {}, None, False
        elif line.startswith("#,") and "fuzzy" in line:
            fuzzy = True
        elif line.startswith("#"):
            continue
        elif line.startswith('"') and key is not None:
            entry[key].append(line)
        else:
            key, _, rest = line.partition(" ")
            entry[key] = [rest]
    return out


def django_locale_files(lang: str) -> list[Path]:
    try:
        import django
    except ImportError as exc:
        raise DataError("The Django catalog corpus reads the installed Django package; install it with "
                        "`pip install Django` (a test-only dependency of this project).") from exc
    root = Path(django.__file__).parent
    files = sorted(root.rglob(f"locale/{lang}/LC_MESSAGES/django.po"))
    if not files:
        raise DataError(f"The installed Django ({root}) has no catalogs for language {lang!r}; choose another "
                        f"language, e.g. de, fr, es, cs or vi.")
    return files


def catalog_pairs(lang: str) -> list[tuple[str, str]]:
    """(English, ``lang``) pairs from every Django catalog of ``lang``, first occurrence of each id kept."""
    seen: set[str] = set()
    pairs = []
    for path in django_locale_files(lang):
        for en, xx in parse_po(path.read_text(encoding="utf-8")):
            en, xx = " ".join(en.split()), " ".join(xx.split())
            if en and xx and en not in seen:
                seen.add(en)
                pairs.append((en, xx))
    return pairs


def prepare_django(root: str | Path, lang: str = "de", bpe_merges: int = 500, source_lang: str | None = None,
                   target_lang: str | None = None) -> Path:
    """Tokenize, lowercase, BPE and binarize the catalogs of ``lang`` into ``root`` (``lang`` -> en by default)."""
    from .binarize import write_data_bin
    from .prepare import learn_and_apply_bpe, tokenize

    src_lang, tgt_lang = source_lang or lang, target_lang or "en"
    if {src_lang, tgt_lang} != {lang, "en"}:
        raise DataError(f"The Django corpus pairs English with {lang!r}; set data.source_lang/target_lang to "
                        f"{lang}/en or en/{lang}.")
    pairs = catalog_pairs(lang)
    en = [s.lower() for s in tokenize([p[0] for p in pairs], "en")]
    xx = [s.lower() for s in tokenize([p[1] for p in pairs], lang)]
    sides = {"en": en, lang: xx}
    src, tgt = sides[src_lang], sides[tgt_lang]
    keep = [i for i in range(len(src)) if src[i].strip() and tgt[i].strip()]
    split = {"train": [i for i in keep if i % 10 not in (3, 7)], "valid": [i for i in keep if i % 10 == 3],
             "test": [i for i in keep if i % 10 == 7]}
    splits = {n: [[src[i] for i in idx], [tgt[i] for i in idx]] for n, idx in split.items()}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if bpe_merges > 0:
        splits = learn_and_apply_bpe(splits["train"], splits, bpe_merges, root / "code")
    write_data_bin(root, {n: (s[0], s[1]) for n, s in splits.items()}, src_lang, tgt_lang)
    return root
