"""CLIP's tokenizer files from open_clip's BPE, for tiny models and tiny reward models.

Imports neither diffusers nor peft: reward servers use it too.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def write_clip_tokenizer_files(directory: Path) -> None:
    """Write CLIP's vocab.json and merges.txt from the BPE file that open_clip_torch ships.

    CLIP's vocabulary is: the 256 byte symbols, the same with the end-of-word marker, one token per merge
    (49152 - 256 - 2 of them), then the two special tokens (49408 in all), which is the order of the
    hub's ``openai/clip-vit-*`` tokenizer files.
    """
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]  # noqa: SIM115 (read at once)
    from open_clip.tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
