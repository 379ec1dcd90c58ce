"""Build the training corpus of tpserve's bundled demo model from Debian packages.

Sources (all public domain or permissively licensed, all fetched with
`apt-get download` and unpacked with `dpkg -x`, so no network beyond the
Debian archive is needed):

  bible-kjv-text + bible-kjv  King James Bible (public domain); the `bible`
                              program of bible-kjv decodes the compressed text
  jargon-text                 The Jargon File 4.4.7 (public domain)
  fortunes-min                BSD fortune's `fortunes`, `literature`, `riddles`
                              (BSD licence)
  python3.11-doc              Python 3.11 documentation sources (PSF licence)

Writes WORK/corpus.jsonl.gz, one record per document:
  {"split": "train"|"heldout", "source": str, "text": str}            plain text
  {"split": ..., "source": str, "messages": [{"role", "content"}...]}  chat pair
and WORK/sources.json (package, version, licence) for the model card.
About 3% of the documents, chosen by a stable hash, form the held-out split;
chat pairs made from a held-out document are held out with it.

Usage:  python3 scripts/prepare_demo_corpus.py --work .demo_data
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
from pathlib import Path

PACKAGES = {
    "bible-kjv-text": "public domain (King James Version, 1611/1769 text)",
    "bible-kjv": "GPL-2+ (decoder program only; used to read the text, not trained on)",
    "jargon-text": "public domain (The Jargon File, Eric S. Raymond et al.)",
    "fortunes-min": "BSD (NetBSD fortune data files)",
    "python3.11-doc": "PSF License Agreement (Python documentation sources)",
}
HELDOUT_PERCENT = 3
BOOKS = (
    "Ge:Genesis Exo:Exodus Lev:Leviticus Num:Numbers Deu:Deuteronomy Josh:Joshua "
    "Jdgs:Judges Ruth:Ruth 1Sm:1_Samuel 2Sm:2_Samuel 1Ki:1_Kings 2Ki:2_Kings "
    "1Chr:1_Chronicles 2Chr:2_Chronicles Ezra:Ezra Neh:Nehemiah Est:Esther Job:Job "
    "Psa:Psalms Prv:Proverbs Eccl:Ecclesiastes SSol:Song_of_Solomon Isa:Isaiah "
    "Jer:Jeremiah Lam:Lamentations Eze:Ezekiel Dan:Daniel Hos:Hosea Joel:Joel "
    "Amos:Amos Obad:Obadiah Jonah:Jonah Mic:Micah Nahum:Nahum Hab:Habakkuk "
    "Zep:Zephaniah Hag:Haggai Zec:Zechariah Mal:Malachi Mat:Matthew Mark:Mark "
    "Luke:Luke John:John Acts:Acts Rom:Romans 1Cor:1_Corinthians 2Cor:2_Corinthians "
    "Gal:Galatians Eph:Ephesians Phi:Philippians Col:Colossians 1Th:1_Thessalonians "
    "2Th:2_Thessalonians 1Tim:1_Timothy 2Tim:2_Timothy Titus:Titus Phmn:Philemon "
    "Heb:Hebrews Jas:James 1Pet:1_Peter 2Pet:2_Peter 1Jn:1_John 2Jn:2_John "
    "3Jn:3_John Jude:Jude Rev:Revelation"
)
BOOK_NAMES = dict(p.replace("_", " ").split(":") for p in BOOKS.split())
SYSTEM_PROMPT = "You are a helpful assistant."
JARGON_QUESTIONS = (
    "What does \"{t}\" mean?", "What is {t}?", "Define {t}.",
    "In hacker slang, what does \"{t}\" mean?", "Explain the jargon term \"{t}\".",
)
FORTUNE_QUESTIONS = ("Tell me a fortune.", "Say something witty.", "Give me a fortune cookie.")
VERSE_QUESTIONS = ("Quote {r}.", "What does {r} say?", "Recite {r} from the King James Bible.")


def fetch_packages(work: Path) -> dict[str, Path]:
    """Download (if missing) and unpack each package; returns name -> unpacked root."""
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    roots = {}
    for name in PACKAGES:
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", name], cwd=debs, check=True)
            found = sorted(debs.glob(f"{name}_*.deb"))
        root = debs / f"x_{name}"
        if not root.exists():
            subprocess.run(["dpkg", "-x", str(found[-1]), str(root)], check=True)
        roots[name] = root
    return roots


def package_version(work: Path, name: str) -> str:
    deb = sorted((work / "debs").glob(f"{name}_*.deb"))[-1]
    out = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True)
    return out.stdout.strip()


def bible_chapters(roots: dict[str, Path]) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(chapter title, [(verse reference, verse text)])] decoded with the `bible` program."""
    program = roots["bible-kjv"] / "usr/bin/bible"
    data_dir = roots["bible-kjv-text"] / "usr/lib"
    out = subprocess.run(
        [str(program), "-p", str(data_dir), "-f", "Gen1:1-Rev22:21"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True,
    ).stdout
    chapters: dict[str, list[tuple[str, str]]] = {}
    for line in out.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if m:
            title = f"{BOOK_NAMES[m[1]]} {m[2]}"
            chapters.setdefault(title, []).append((f"{title}:{m[3]}", m[4].strip()))
    return list(chapters.items())


def jargon_entries(roots: dict[str, Path]) -> list[tuple[str, str]]:
    """[(headword, body)] from the lexicon section of the Jargon File."""
    path = roots["jargon-text"] / "usr/share/doc/jargon-text/jargon.txt.gz"
    text = gzip.open(path, "rt", encoding="utf-8").read()
    text = text[: text.find("\nAppendix A. Hacker Folklore")]
    parts = re.split(r"^   :([^:\n]+):([^\n]*)$", text, flags=re.M)
    entries = []
    for i in range(1, len(parts) - 2, 3):
        body = "\n".join(line[3:] for line in parts[i + 2].strip("\n").splitlines())
        body = re.sub(r"\{([^{}]+)\}", r"\1", body).strip()
        if body:
            entries.append((parts[i].strip(), f"{parts[i].strip()}:{parts[i + 1]}\n\n{body}"))
    return entries


def fortunes(roots: dict[str, Path]) -> list[str]:
    folder = roots["fortunes-min"] / "usr/share/games/fortunes"
    items = []
    for name in ("fortunes", "literature", "riddles"):
        raw = (folder / f"{name}.u8").read_text(encoding="utf-8", errors="replace")
        items += [f.strip("\n") for f in re.split(r"^%$", raw, flags=re.M) if f.strip()]
    return items


_NOISY_DIRECTIVE = re.compile(
    r"^\s*\.\. (_[^:]*:|index::|moduleauthor::|sectionauthor::|testsetup::|testcleanup::|"
    r"audit-event::|toctree::|highlight::|include::|raw::|only::|impl-detail::|\|)"
)


def clean_rst(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if _NOISY_DIRECTIVE.match(line) or re.match(r"^\s*:(synopsis|maxdepth|noindex|platform):", line):
            continue
        if re.fullmatch(r"[=\-~^*#+]{4,}", line.strip()):
            continue
        line = re.sub(r":[a-z]+(?::[a-z]+)?:`[~!]?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", line)
        line = re.sub(r"`([^`<]+?)\s*<[^>]*>`_+", r"\1", line)
        lines.append(line.replace("``", "`").rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def python_doc_chunks(roots: dict[str, Path], chunk_chars: int = 4000) -> list[tuple[str, str]]:
    """[(document name, chunk)] of the cleaned reST sources, split at paragraph breaks."""
    base = roots["python3.11-doc"] / "usr/share/doc/python3.11/html/_sources"
    chunks = []
    for path in sorted(base.rglob("*.rst.txt")):
        name = str(path.relative_to(base))
        if name.startswith("whatsnew/changelog"):
            continue
        current = ""
        for para in clean_rst(path.read_text(encoding="utf-8")).split("\n\n"):
            if current and len(current) + len(para) > chunk_chars:
                chunks.append((name, current))
                current = ""
            current = f"{current}\n\n{para}" if current else para
        if current:
            chunks.append((name, current))
    return chunks


def is_heldout(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def chat(question: str, answer: str, rng: random.Random) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        turns.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return turns


def build_records(roots: dict[str, Path], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []

    def add(source: str, key: str, text: str | None = None, messages=None) -> None:
        split = "heldout" if is_heldout(key) else "train"
        rec = {"split": split, "source": source}
        rec.update({"text": text} if messages is None else {"messages": messages})
        records.append(rec)

    for title, verses in bible_chapters(roots):
        add("kjv", title, text=f"{title}\n\n" + "\n".join(f"{r.split(':')[-1]} {v}" for r, v in verses))
        for ref, verse in rng.sample(verses, k=min(3, len(verses))):
            question = rng.choice(VERSE_QUESTIONS).format(r=ref)
            add("kjv-chat", title, messages=chat(question, verse, rng))
    for term, body in jargon_entries(roots):
        add("jargon", term, text=body)
        definition = body.split("\n\n", 2)[1].replace("\n", " ")
        question = rng.choice(JARGON_QUESTIONS).format(t=term)
        add("jargon-chat", term, messages=chat(question, definition, rng))
    for i, fortune in enumerate(fortunes(roots)):
        add("fortunes", f"fortune-{i}", text=fortune)
        if rng.random() < 0.3:
            add("fortunes-chat", f"fortune-{i}", messages=chat(rng.choice(FORTUNE_QUESTIONS), fortune, rng))
    for i, (name, chunk) in enumerate(python_doc_chunks(roots)):
        add("python-docs", f"{name}#{i}", text=chunk)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(".demo_data"),
                        help="folder for the downloaded packages and the corpus (default .demo_data)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    roots = fetch_packages(args.work)
    records = build_records(roots, args.seed)
    with gzip.open(args.work / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    sources = [{"package": n, "version": package_version(args.work, n), "license": lic}
               for n, lic in PACKAGES.items()]
    (args.work / "sources.json").write_text(json.dumps(sources, indent=2) + "\n")
    counts: dict[str, list[int]] = {}
    for rec in records:
        c = counts.setdefault(f"{rec['source']}/{rec['split']}", [0, 0])
        c[0] += 1
        c[1] += len(rec.get("text") or json.dumps(rec["messages"]))
    for key, (n, chars) in sorted(counts.items()):
        print(f"{key:28s} {n:7d} docs {chars / 1e6:8.2f} M chars")


if __name__ == "__main__":
    main()
