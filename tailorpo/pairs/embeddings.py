"""Diff-contrast's joint prompt+image embeddings f(y, x) from a real CLIP, computed once per pair and cached.

The weights W_ij of Diff-contrast (Eq. 9; a later version of Diffusion-RPO, arXiv 2406.06382) compare winner i
with loser j through f, a CLIP embedding of the image together with its prompt
(``objectives.clip_joint_embedding``). f depends only on the pair, never on the LoRA, so it is computed the first
time a pair is trained on and looked up after that: CLIP then costs one forward per pair for the whole run,
whatever the number of passes over the data.

The cache is keyed by the pair's source row (``PairRecord.index``: line of ``pairs.jsonl``, row of the parquet
shards or of the dataset), which is stable across passes and across a resume. Pairs of the policy's own samples
(no ``pairs.source``) are new every time: they are embedded without a cache. It lives in memory (row -> (2, D)
float32: [f(y^w, x), f(y^l, x)], 6 KB per pair at CLIP-L's D = 768) and on disk as safetensors shards in one
folder: ``flush`` appends the rows added since the previous flush as one new shard (no rewrite of the old ones,
so a flush costs only what is new), and the trainer flushes before each checkpoint, so a resumed run reads
exactly the values the interrupted one used. Each shard is tagged with the CLIP model and the pair source; a
cache folder written for another model or data set is refused rather than silently mixed in.

Loading (strict key check), feature extraction across transformers versions and CLIP's preprocessing in tensor
ops are the CLIP reward servers' (``tailorpo.rewards.clip``, ``tailorpo.rewards.preprocess``), shared, not copied.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPTokenizer

from tailorpo.config import ConfigError
from tailorpo.core.objectives import clip_joint_embedding
from tailorpo.pairs.data import PairBatch
from tailorpo.rewards.clip import clip_features, load_hf_clip
from tailorpo.rewards.preprocess import clip_preprocess

SHARD_PREFIX = "shard-"


class EmbeddingCache:
    """Source row -> (2, D) embeddings [winner, loser] in memory, persisted as append-only safetensors shards.

    ``tag`` (e.g. the CLIP model id and the pair source) is stored in every shard's metadata; an existing shard
    with a different tag is an error naming the config field, since row numbers of another source or vectors
    of another model would be silently wrong."""

    def __init__(self, folder: str | Path, tag: dict[str, str]) -> None:
        self.folder = Path(folder)
        self.tag = tag
        self.entries: dict[int, torch.Tensor] = {}
        self.unsaved: list[int] = []
        for shard in sorted(self.folder.glob(f"{SHARD_PREFIX}*.safetensors")):
            self._read(shard)

    def _read(self, shard: Path) -> None:
        with safe_open(str(shard), framework="pt") as f:
            found = json.loads((f.metadata() or {}).get("tag", "{}"))
            if found != self.tag:
                raise ConfigError(
                    f"pairs.diff_contrast.embedding_cache: {shard} was computed for {found}, not {self.tag}; "
                    "point embedding_cache at another folder or delete this one"
                )
            rows, embeds = f.get_tensor("rows"), f.get_tensor("embeds")
        self.entries.update(zip(rows.tolist(), embeds, strict=True))

    def __contains__(self, row: int) -> bool:
        return row in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, rows: list[int]) -> torch.Tensor:
        """(M, 2, D) for the given source rows."""
        return torch.stack([self.entries[row] for row in rows])

    def put(self, rows: list[int], embeds: torch.Tensor) -> None:
        """Store (N, 2, D) embeddings of N new rows (kept on the CPU in float32)."""
        for row, value in zip(rows, embeds.detach().float().cpu(), strict=True):
            if row not in self.entries:
                self.unsaved.append(row)
            self.entries[row] = value

    def flush(self) -> None:
        """Write the rows added since the last flush as one new shard (atomically: temp file, then rename)."""
        if not self.unsaved:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        shard = self.folder / f"{SHARD_PREFIX}{len(list(self.folder.glob(f'{SHARD_PREFIX}*'))):06d}.safetensors"
        tmp = shard.with_name(f".tmp-{shard.name}")
        tensors = {"rows": torch.tensor(self.unsaved, dtype=torch.long), "embeds": self.get(self.unsaved)}
        save_file(tensors, str(tmp), metadata={"tag": json.dumps(self.tag, sort_keys=True)})
        os.replace(tmp, shard)
        self.unsaved = []


class ClipPairEmbedder:
    """f(y^w, x) and f(y^l, x) for a batch of pairs from a transformers ``CLIPModel``: image features of both
    images and text features of the prompt (``get_image_features`` / ``get_text_features``), combined by
    ``clip_joint_embedding``; each pair is embedded once and then read from ``cache`` (None: every call embeds)."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, cache: EmbeddingCache | None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.cache = cache
        self.image_size = model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings
        self.computed = 0  # pairs embedded by CLIP in this process (the rest came from the cache)

    @classmethod
    def load(
        cls, source: str, device: torch.device | str, cache_folder: str | Path | None, data_tag: dict[str, str]
    ) -> ClipPairEmbedder:
        """CLIP from a hub id or a local folder in transformers format (config, weights, tokenizer files); the
        weights are checked key by key as the CLIP reward servers check theirs. The cache is opened first, so a
        mismatched one fails before CLIP loads."""
        cache = None if cache_folder is None else EmbeddingCache(cache_folder, {"clip_model": source, **data_tag})
        try:
            model = load_hf_clip(source, str(device))
            tokenizer = CLIPTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"pairs.diff_contrast.clip_model={source!r}: could not load a transformers CLIPModel and its "
                f"tokenizer ({err}); give a hub id such as openai/clip-vit-large-patch14 or a local folder"
            ) from err
        return cls(model, tokenizer, cache)

    @torch.no_grad()
    def _embed(self, image_w: torch.Tensor, image_l: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 2, D) [f(y^w, x), f(y^l, x)]: one image forward on [w; l], one text forward for the shared prompts."""
        device = self.model.device
        images = (torch.cat([image_w, image_l]).to(device, torch.float32) + 1) / 2  # [-1, 1] -> [0, 1]
        pixels = clip_preprocess(images, self.image_size).to(self.model.dtype)
        image_features = clip_features(self.model.get_image_features(pixel_values=pixels))  # (2N, D)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        text_features = clip_features(self.model.get_text_features(**tokens))  # (N, D)
        feat_w, feat_l = image_features.float().chunk(2)
        text = text_features.float()
        return torch.stack([clip_joint_embedding(feat_w, text), clip_joint_embedding(feat_l, text)], dim=1)

    def __call__(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, D) winner and (M, D) loser embeddings of the batch's pairs, embedding only rows not cached yet."""
        if self.cache is None:
            self.computed += len(batch.prompts)
            both = self._embed(batch.image_w, batch.image_l, batch.prompts)
            return both[:, 0], both[:, 1]
        rows = batch.index.tolist()
        new = list({row: i for i, row in enumerate(rows) if row not in self.cache}.values())  # a row once
        if new:
            embeds = self._embed(batch.image_w[new], batch.image_l[new], [batch.prompts[i] for i in new])
            self.cache.put([rows[i] for i in new], embeds)
            self.computed += len(new)
        both = self.cache.get(rows).to(self.model.device)  # (M, 2, D)
        return both[:, 0], both[:, 1]
