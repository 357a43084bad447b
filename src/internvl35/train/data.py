"""Where training examples come from: a weighted mix of the mini world and JSONL conversation files,
deterministic by (seed, stage, example index) so that a resumed run sees exactly the same data."""

from __future__ import annotations

import random
from dataclasses import replace
from collections.abc import Iterator
from pathlib import Path

import torch

from internvl35.data.image import preprocess_image
from internvl35.data.sft import Example, ImageSettings, jsonl_records, tokenize_record, world_record
from internvl35.data.template import Template
from internvl35.data.tokenizer import Tokenizer
from internvl35.train.config import DataSource, Stage
from internvl35.train.prefetch import Prefetcher


class ExampleSource:
    def __init__(self, stage: Stage, tok: Tokenizer, template: Template, settings: ImageSettings, seed: int,
                 system: str | None = None, patch_size: int = 14, workers: int = 0):
        self.stage, self.tok, self.template, self.settings, self.seed = stage, tok, template, settings, seed
        self.patch_size = patch_size
        self.system = system
        self.sources = stage.data
        self.weights = [d.weight for d in self.sources]
        self._jsonl: dict[int, list] = {}
        self._order: dict[tuple[int, int], list[int]] = {}  # (source, epoch) -> shuffled record order
        self._scanned, self._counts = 0, [0] * len(self.sources)  # examples 0.._scanned-1 counted per source
        self._prefetch = Prefetcher(self, workers)
        self._dense: tuple[int, Iterator] | None = None  # (next index, its iterator) of the dense stream

    def __getstate__(self) -> dict:
        # what worker processes receive: everything but the workers themselves
        return {**self.__dict__, "_prefetch": None, "_dense": None}

    def close(self) -> None:
        self._prefetch.close()

    def _records(self, i: int, d: DataSource) -> list:
        if i not in self._jsonl:
            self._jsonl[i] = jsonl_records(Path(d.path))
        return self._jsonl[i]

    def _epoch_order(self, i: int, d: DataSource, epoch: int) -> list[int]:
        """The record order of one pass over a JSONL source (reshuffled every pass, computed once)."""
        if (i, epoch) not in self._order:
            order = list(range(len(self._records(i, d))))
            random.Random(f"{self.seed}:{d.path}:{epoch}").shuffle(order)
            self._order = {(i, epoch): order, **{k: v for k, v in self._order.items() if k[0] != i}}
        return self._order[(i, epoch)]

    def _source(self, idx: int) -> tuple[random.Random, int]:
        rng = random.Random(f"{self.seed}:{self.stage.name}:{idx}")
        return rng, rng.choices(range(len(self.sources)), self.weights)[0]

    def _position(self, idx: int, i: int) -> int:
        """How many earlier examples drew source `i`: a JSONL source's own counter, so that each of its
        passes is an exact permutation however the sources are mixed. Examples are read in order, so
        the scan is incremental (reading backwards rescans from 0)."""
        if idx < self._scanned:
            self._scanned, self._counts = 0, [0] * len(self.sources)
        for j in range(self._scanned, idx):
            self._counts[self._source(j)[1]] += 1
        self._scanned = idx
        return self._counts[i]

    def _pick(self, idx: int) -> tuple[random.Random, int, DataSource, str | None]:
        """The example's RNG, source (index and spec) and, for the world, its task family."""
        rng, i = self._source(idx)
        d = self.sources[i]
        family = None
        if d.source == "world":
            from internvl35.data.world import FAMILIES
            fams = d.families or {f: 1.0 for f in FAMILIES}
            family = rng.choices(list(fams), list(fams.values()))[0]
        return rng, i, d, family

    def example(self, idx: int) -> Example:
        rng, i, d, family = self._pick(idx)
        settings = replace(self.settings, jpeg_augment=True) if d.jpeg_augment else self.settings
        if d.source == "world":
            record, root = world_record(family, rng.getrandbits(48), easy=d.easy, big_text=d.big_text,
                                        followups=d.followups), None
        elif d.source == "jsonl":
            records = self._records(i, d)
            epoch, k = divmod(self._position(idx, i), len(records))
            record, root = records[self._epoch_order(i, d, epoch)[k]], Path(d.root) if d.root else Path(d.path).parent
        else:
            raise ValueError(f"unknown data source {d.source!r} (use 'world' or 'jsonl')")
        return tokenize_record(record, self.tok, self.template, settings, rng, root, self.system)

    def stream(self, start: int) -> Iterator[tuple[int, Example]]:
        return self._prefetch.iterate("example", start)

    def dense_example(self, idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Tiles [T, 3, S, S] and per-patch labels [T, P, K] of a world sample (None: no image)."""
        from internvl35.data.world import Style, generate
        from internvl35.data.world.dense import tile_targets
        from internvl35.data.world.render import annotate

        rng, _, d, family = self._pick(idx)
        if d.source != "world":
            raise ValueError("the dense vision objective needs mini-world data sources (per-patch labels)")
        with annotate() as ann:
            sample = generate(family, rng.getrandbits(48), Style(easy=d.easy, big_text=d.big_text))
        if not sample.images:
            return None
        s = self.settings
        per_image = 1 if sample.video else max(1, s.max_tiles // len(sample.images))
        tiles = [preprocess_image(im, s.image_size, per_image, s.use_thumbnail) for im in sample.images]
        labels = [tile_targets(ann.marks(im), *im.size, s.image_size, self.patch_size, per_image, s.use_thumbnail)
                  for im in sample.images]
        return torch.cat(tiles), torch.cat(labels)

    def dense_batch(self, start: int, tiles: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Examples from `start` on until at least `tiles` tiles: (next example, tiles, labels)."""
        if self._dense is None or self._dense[0] != start:
            self._dense = (start, self._prefetch.iterate("dense_example", start))
        it = self._dense[1]
        xs, ys, n, idx = [], [], 0, start
        while n < tiles:
            idx, got = next(it)
            idx += 1
            if got is not None:
                xs.append(got[0])
                ys.append(got[1])
                n += got[0].shape[0]
        self._dense = (idx, it)
        return idx, torch.cat(xs), torch.cat(ys)


def world_corpus(n_per_family: int = 400, seed: int = 12345) -> list[str]:
    """Text of the mini world (questions, answers, templates) to train its tokenizer on."""
    from internvl35.config import CONFIGS
    from internvl35.data.template import DEFAULT_SYSTEM, THINKING_SYSTEM
    from internvl35.data.world import FAMILIES, generate

    # Every example carries the system message and the role names: weighting them by that frequency
    # makes them a few tokens each (unweighted, "assistant" was 6 tokens and the prompt header 33).
    texts = [DEFAULT_SYSTEM] + [CONFIGS["mini"].system_message, "system\n", "user\n", "assistant\n"] * (
        n_per_family * len(FAMILIES)) + [THINKING_SYSTEM] * n_per_family
    for fam in FAMILIES:
        for i in range(n_per_family):
            s = generate(fam, seed + i)
            texts += [s.question, s.answer] + [t for qa in s.followups for t in qa]
    return texts
