"""Gradient direction analysis: per-edit MEND updates of one weight, projected, PCA-reduced, embedded in 2-D, scored for task separation.

DESIGN.md §6: with instructions the MEND-transformed gradients of different tasks form separate
clusters; without them (multi-task MEND) they collapse together. Each edit's α-scaled update
α·Σ_t δ̃_t ũ_tᵀ of the chosen weight is sketched to a fixed size by a seeded Gaussian projection of
the matrix (``MatrixSketch``), optionally normalized to unit length (its direction), reduced with PCA
and embedded in 2-D (t-SNE or the first two principal components). Separation is a number: the
silhouette of the task labels in the PCA space, and the ratio of mean between-task to mean
within-task distance.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import pairwise_distances, silhouette_score
from tqdm.auto import tqdm

from instructedit.analysis import plots
from instructedit.config import DEFAULT_MODEL
from instructedit.editors.mend import MENDEditor
from instructedit.io import write_json
from instructedit.models.loading import load_model, max_input_length
from instructedit.records import TASKS, EditRecord
from instructedit.tasks.collate import Collator, PromptTooLongError
from instructedit.tasks.instructions import InstructionPool
from instructedit.tasks.splits import load_task_splits
from instructedit.runs import CHECKPOINTS, CONFIG as RUN_CONFIG, EDITOR_CONFIG as CONFIG_NAME

logger = logging.getLogger(__name__)

EMBEDDINGS = ("tsne", "pca")
ModelLoader = Callable[[str, str], tuple[Any, Any]]  # (model name, device) -> (model, tokenizer)


# --- which editor, and with which instruction setting ---------------------------------------------


@dataclass(frozen=True)
class EditorSpec:
    """A saved MEND editor and how to apply it: with the instruction pool's wrapping or without."""

    path: Path
    label: str
    instructions: bool
    model_name: str
    instructions_from: str  # where the setting was read ("editor_config.json", "../config.yaml", "--instructions")


def recorded_instructions(editor_dir: str | Path) -> tuple[bool | None, str]:
    """``data.instructions`` of the run that trained the editor: its editor_config.json, else ``../config.yaml``."""
    editor_dir = Path(editor_dir)
    config_path = editor_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{editor_dir} is not a saved editor: {CONFIG_NAME} is missing (pass RUN/best or RUN/last)")
    data = json.loads(config_path.read_text())
    for value in (data.get("data", {}).get("instructions") if isinstance(data.get("data"), dict) else None, data.get("instructions")):
        if isinstance(value, bool):
            return value, CONFIG_NAME
    run_config = editor_dir.parent / RUN_CONFIG
    if run_config.is_file():
        values = yaml.safe_load(run_config.read_text()) or {}
        value = (values.get("data") or {}).get("instructions")
        if isinstance(value, bool):
            return value, f"../{RUN_CONFIG}"
    return None, ""


def default_label(editor_dir: str | Path) -> str:
    """``runs/instructedit/best`` -> ``instructedit``: the run folder's name for checkpoint folders."""
    path = Path(editor_dir).resolve()
    return path.parent.name if path.name in CHECKPOINTS else path.name


def editor_spec(path: str | Path, label: str | None = None, instructions: str = "auto", model: str | None = None) -> EditorSpec:
    """Resolve one ``--editor`` with its ``--label`` / ``--instructions on|off|auto`` / ``--model``."""
    if instructions not in ("auto", "on", "off"):
        raise ValueError(f"--instructions {instructions!r} must be on, off or auto")
    path = Path(path)
    recorded, where = recorded_instructions(path)
    if instructions != "auto":
        setting, where = instructions == "on", "--instructions"
    elif recorded is None:
        raise ValueError(
            f"editor {path}: cannot tell whether it was trained with instructions (no data.instructions in {CONFIG_NAME} "
            f"or in {path.parent / RUN_CONFIG}); pass --instructions on or off for it"
        )
    else:
        setting = recorded
    model_name = model or json.loads((path / CONFIG_NAME).read_text()).get("model_name") or DEFAULT_MODEL
    return EditorSpec(path, label or default_label(path), setting, model_name, where)


# --- per-edit updates -------------------------------------------------------------------------------


class MatrixSketch:
    """A seeded Gaussian sketch of a (d_out, d_in) matrix: G ↦ R_out G R_inᵀ / sqrt(k_out k_in), flattened.

    A dense Gaussian projection of vec(G) to 2048 dims would need d_out·d_in·2048 numbers (7 GB for
    one SmolLM2 MLP matrix); this Kronecker-structured one (R_out ⊗ R_in) needs (d_out + d_in)·~45
    and, like it, preserves squared norms in expectation. Sides at most as large as their share of
    ``dim`` are kept whole; a matrix with at most ``dim`` entries is only flattened.
    """

    def __init__(self, shape: tuple[int, int], dim: int, seed: int = 0) -> None:
        if dim < 1:
            raise ValueError(f"projection dim must be >= 1, got {dim}")
        d_out, d_in = shape
        self.shape = (d_out, d_in)
        self.identity = d_out * d_in <= dim
        k_out = min(d_out, max(1, math.isqrt(dim)))
        k_in = min(d_in, max(1, dim // k_out))
        k_out = min(d_out, max(1, dim // k_in))
        self.k_out, self.k_in = k_out, k_in
        gen = torch.Generator().manual_seed(seed)
        self.r_out = torch.randn(k_out, d_out, generator=gen) if k_out < d_out else None  # (k_out, d_out)
        self.r_in = torch.randn(k_in, d_in, generator=gen) if k_in < d_in else None  # (k_in, d_in)

    @property
    def dim(self) -> int:
        return self.shape[0] * self.shape[1] if self.identity else self.k_out * self.k_in

    def __call__(self, matrix: torch.Tensor) -> np.ndarray:
        if tuple(matrix.shape) != self.shape:
            raise ValueError(f"MatrixSketch for shape {self.shape} got a matrix of shape {tuple(matrix.shape)}")
        g = matrix.detach().float().cpu()
        if self.identity:
            return g.reshape(-1).numpy()
        scale = 1.0
        if self.r_out is not None:
            g = self.r_out @ g  # (k_out, d_in)
            scale *= self.k_out
        if self.r_in is not None:
            g = g @ self.r_in.T  # (k_out, k_in)
            scale *= self.k_in
        return (g / math.sqrt(scale)).reshape(-1).numpy()


def resolve_weight(editor: MENDEditor, weight: str | None) -> str:
    """The editable weight to study: ``weight`` (a full name or a unique suffix), default the last inner weight."""
    names = [w.name for w in editor.weights]
    if weight is None:
        return names[-1]
    if weight in names:
        return weight
    matches = [n for n in names if n.endswith(weight)]
    if len(matches) != 1:
        raise ValueError(f"--weight {weight!r} matches {len(matches)} of the editor's weights; valid weights: {names}")
    return matches[0]


@dataclass
class UpdateSet:
    """The sketched update vectors of one editor, one row per edit."""

    vectors: np.ndarray  # (n_edits, sketch_dim)
    tasks: list[str]
    sources: list[str]
    norms: list[float]  # Frobenius norm of each full update, before any normalization
    weight: str
    skipped: list[dict[str, str]] = field(default_factory=list)


@torch.no_grad()
def collect_updates(
    editor: MENDEditor, model: torch.nn.Module, tokenizer: Any, records: Sequence[EditRecord], pool: InstructionPool | None,
    instruction: int | None, weight: str | None = None, projection_dim: int = 2048, normalize: bool = True, seed: int = 0,
    max_length: int | None = None, progress: bool = False,
) -> UpdateSet:
    """MEND's α-scaled update of ``weight`` for each record's edit input (as the evaluation runner builds it)."""
    name = resolve_weight(editor, weight)
    shape = tuple(editor.split(model).model.get_parameter(name).shape)
    sketch = MatrixSketch(shape, projection_dim, seed)  # type: ignore[arg-type]
    max_length = max_length or max_input_length(model)
    collator = Collator(tokenizer, max_length, pool)
    device = next(model.parameters()).device
    split = editor.split(model)
    was_training = editor.training
    editor.eval()
    vectors, tasks, sources, norms, skipped = [], [], [], [], []
    try:
        for record in tqdm(records, desc="updates", unit="edit", disable=not progress):
            try:
                batch = collator.qa_batch(collator.edit_pairs(record, instruction), record.source).to(device)
            except PromptTooLongError as err:
                skipped.append({"source": record.source, "reason": str(err)})
                continue
            update = editor.edit(split, batch).updates[name]
            vec = sketch(update)
            norm = float(update.float().norm())
            if normalize:
                length = float(np.linalg.norm(vec))
                vec = vec / length if length > 0 else vec
            vectors.append(vec.astype(np.float32))
            tasks.append(record.task)
            sources.append(record.source)
            norms.append(norm)
    finally:
        editor.train(was_training)
    if skipped:
        logger.warning("skipped %d of %d records longer than %d tokens", len(skipped), len(records), max_length)
    if not vectors:
        raise ValueError(f"none of the {len(records)} records fits max_length={max_length} tokens")
    return UpdateSet(np.stack(vectors), tasks, sources, norms, name, skipped)


# --- reduction, embedding, separation -----------------------------------------------------------------


def pca_reduce(vectors: np.ndarray, n_components: int = 50, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Principal components (capped at n_samples - 1 and n_features) and their explained-variance ratios."""
    n, d = vectors.shape
    k = max(1, min(n_components, n - 1, d))
    pca = PCA(n_components=k, random_state=seed)
    return pca.fit_transform(vectors), [float(v) for v in pca.explained_variance_ratio_]


def embed_2d(reduced: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """2-D coordinates: t-SNE of the PCA space, or its first two principal components."""
    if method not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {method!r}; valid embeddings: {list(EMBEDDINGS)}")
    n = reduced.shape[0]
    if method == "pca" or n < 4:
        coords = reduced[:, :2]
        return np.hstack([coords, np.zeros((n, 2 - coords.shape[1]))]) if coords.shape[1] < 2 else coords
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))  # t-SNE needs perplexity < n_samples
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)


def separation_scores(reduced: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """How well the task labels separate the points: silhouette, and between- / within-task mean distance."""
    labels_arr = np.asarray(labels)
    classes = list(dict.fromkeys(labels))
    n = len(labels_arr)
    if n != reduced.shape[0]:
        raise ValueError(f"{reduced.shape[0]} points but {n} labels")
    dist = pairwise_distances(reduced)
    same = labels_arr[:, None] == labels_arr[None, :]
    off_diag = ~np.eye(n, dtype=bool)
    within = float(dist[same & off_diag].mean()) if (same & off_diag).any() else None
    between = float(dist[~same].mean()) if (~same).any() else None
    silhouette = float(silhouette_score(reduced, labels_arr)) if 2 <= len(classes) < n else None
    per_task = {}
    for task in classes:
        mask = labels_arr == task
        pair = mask[:, None] & mask[None, :] & off_diag
        per_task[task] = {"n": int(mask.sum()), "within_mean_distance": float(dist[pair].mean()) if pair.any() else None}
    ratio = between / within if between is not None and within else None
    return {"silhouette": silhouette, "between_within_ratio": ratio, "between_mean_distance": between,
            "within_mean_distance": within, "per_task": per_task}


# --- the study ---------------------------------------------------------------------------------------


@dataclass
class GradientSettings:
    """What to edit (tasks, split, n) and how to reduce the updates (sketch, normalization, PCA, embedding)."""

    tasks: tuple[str, ...] = ("counterfact", "wikirecent", "convsent", "zsre")
    n: int = 200  # edits per task (a prefix of the seeded split)
    split: str = "test"
    weight: str | None = None  # default: the editor's last inner weight
    projection_dim: int = 2048
    normalize: bool = True  # unit-length updates: compare directions, not magnitudes
    pca_components: int = 50
    embedding: str = "tsne"
    instruction: str = "seen"  # description used by editors that take instructions
    instruction_pool: str | None = None
    data_dir: str | None = None
    split_seed: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if not self.tasks:
            raise ValueError("--tasks needs at least one task")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"--tasks: unknown task(s) {unknown}; valid tasks: {list(TASKS)}")
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"--embedding {self.embedding!r} must be one of {list(EMBEDDINGS)}")
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"--split {self.split!r} must be train, val or test")
        if self.projection_dim < 2 or self.pca_components < 2:
            raise ValueError("--projection-dim and --pca-components must be >= 2")


def slug(label: str) -> str:
    """A file-name-safe version of an editor label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "editor"


def study_records(settings: GradientSettings) -> list[EditRecord]:
    """The first ``n`` records of each task's split, tasks in the given order."""
    return [r for task in settings.tasks
            for r in load_task_splits(task, settings.data_dir, seed=settings.split_seed).split(settings.split)[: settings.n]]


def analyze_updates(updates: UpdateSet, settings: GradientSettings) -> dict[str, Any]:
    """PCA, separation scores and the 2-D embedding of one editor's updates."""
    reduced, variance = pca_reduce(updates.vectors, settings.pca_components, settings.seed)
    coords = embed_2d(reduced, settings.embedding, settings.seed)
    counts = {task: updates.tasks.count(task) for task in dict.fromkeys(updates.tasks)}
    return {
        "weight": updates.weight, "sketch_dim": int(updates.vectors.shape[1]), "n_per_task": counts,
        "scores": separation_scores(reduced, updates.tasks), "pca_components": reduced.shape[1],
        "pca_explained_variance": variance, "mean_update_norm": {t: float(np.mean([n for n, tt in zip(updates.norms, updates.tasks) if tt == t])) for t in counts},
        "skipped": updates.skipped,
        "embedding": {"method": settings.embedding,
                      "points": [{"task": t, "source": s, "x": float(x), "y": float(y)} for t, s, (x, y) in zip(updates.tasks, updates.sources, coords)]},
        "_coords": coords,
    }


def _subtitle(entry: dict[str, Any]) -> str:
    s = entry["scores"]
    sil = "–" if s["silhouette"] is None else f"{s['silhouette']:.3f}"
    ratio = "–" if s["between_within_ratio"] is None else f"{s['between_within_ratio']:.2f}"
    return f"silhouette {sil}, between/within {ratio}"


def load_for_device(name: str, device: str) -> tuple[Any, Any]:
    return load_model(name, device=device)


def gradient_study(
    specs: Sequence[EditorSpec], settings: GradientSettings, output: str | Path, device: str = "cpu",
    loader: ModelLoader = load_for_device, progress: bool = True, write_figures: bool = True,
) -> dict[str, Any]:
    """Run the analysis for every editor; writes gradients.json, one PNG per editor and a comparison PNG."""
    if not specs:
        raise ValueError("gradient analysis needs at least one --editor")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"editor labels must be unique, got {labels}; pass --label for each --editor")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    pool = InstructionPool.from_file(settings.instruction_pool) if settings.instruction_pool else InstructionPool.default()
    instruction = pool.evaluation_index(settings.instruction)
    records = study_records(settings)
    models: dict[str, tuple[Any, Any]] = {}
    entries = []
    for spec in specs:
        if spec.model_name not in models:
            models[spec.model_name] = loader(spec.model_name, device)
        model, tokenizer = models[spec.model_name]
        editor = MENDEditor.from_pretrained(spec.path, device=next(model.parameters()).device)
        logger.info("%s: %d edits, instructions %s (from %s)", spec.label, len(records), "on" if spec.instructions else "off", spec.instructions_from)
        updates = collect_updates(editor, model, tokenizer, records, pool if spec.instructions else None,
                                  instruction if spec.instructions else None, settings.weight, settings.projection_dim,
                                  settings.normalize, settings.seed, progress=progress)
        entry = {"label": spec.label, "path": str(spec.path), "instructions": spec.instructions,
                 "instructions_from": spec.instructions_from, "model_name": spec.model_name,
                 "instruction": instruction if spec.instructions else None,
                 "instruction_texts": {t: pool.descriptions[t][instruction] for t in settings.tasks} if spec.instructions else None,
                 **analyze_updates(updates, settings)}
        entries.append(entry)
    return write_gradient_outputs(entries, settings, output, pool.source, write_figures)


def write_gradient_outputs(entries: list[dict[str, Any]], settings: GradientSettings, output: Path, pool_source: str,
                           write_figures: bool = True) -> dict[str, Any]:
    axis = "t-SNE" if settings.embedding == "tsne" else "PC"
    figures = []
    panels = []
    for entry in entries:
        coords = entry.pop("_coords")
        tasks = [p["task"] for p in entry["embedding"]["points"]]
        title = f"{entry['label']} ({'with' if entry['instructions'] else 'no'} instructions)"
        if write_figures:
            path = plots.gradient_scatter(output / f"gradients-{slug(entry['label'])}.png", coords, tasks, title, _subtitle(entry), axis)
            entry["figure"] = path.name
            figures.append(path.name)
        panels.append({"coords": coords, "tasks": tasks, "title": title, "subtitle": _subtitle(entry)})
    if write_figures and len(panels) > 1:
        weights = {e["weight"] for e in entries}
        what = f"MEND updates of {weights.pop()}" if len(weights) == 1 else "MEND updates"
        path = plots.gradient_comparison(output / "gradients-comparison.png", panels, f"{what}, coloured by task", axis)
        figures.append(path.name)
    result = {"settings": asdict(settings) | {"instruction_pool_source": pool_source}, "editors": entries, "figures": figures,
              "summary": {e["label"]: {"silhouette": e["scores"]["silhouette"], "between_within_ratio": e["scores"]["between_within_ratio"]} for e in entries}}
    write_json(output / "gradients.json", result)
    return result
