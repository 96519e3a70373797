"""Class names shipped with the package."""
from functools import lru_cache
from importlib import resources

from .errors import DeepvisError
from .units import layer_shapes


@lru_cache(maxsize=None)
def imagenet_labels() -> list[str]:
    """The 1000 ILSVRC-2012 class names, in the standard index order (flamingo is 130)."""
    text = resources.files("deepvis_repro").joinpath("data/imagenet_classes.txt").read_text()
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    assert len(labels) == 1000
    return labels


def read_labels(path) -> list[str]:
    """One class name per line (Caffe's synset_words.txt 'n01440764 tench, ...' lines are
    shortened to their first name)."""
    try:
        with open(path) as f:
            lines = [l.strip() for l in f if l.strip()]
    except OSError as e:
        raise DeepvisError(f"cannot read labels file {path}: {e.strerror}") from None
    out = []
    for l in lines:
        if l[:1] == "n" and l[1:9].isdigit() and " " in l:
            l = l.split(" ", 1)[1].split(",")[0].strip()
        out.append(l)
    return out


def check_label_count(backend, labels_path) -> None:
    """A labels file given by the user names at least every class of the model's output layer
    (a short file would fail deep inside a run, naming nothing)."""
    if not labels_path or labels_path == "imagenet" or not backend.labels:
        return
    out = backend.output_layer
    classes = layer_shapes(backend, [out])[out][0]
    if len(backend.labels) < classes:
        raise DeepvisError(f"labels file {labels_path} names {len(backend.labels)} classes, but the model's "
                           f"output layer {out} has {classes}: give one name per line for each")


def top_classes(labels, p, k: int = 5) -> list[list[tuple[int, str, float]]]:
    """Each row of p (N, classes) as its k most probable classes, fewer when the model has fewer:
    (index, label, probability); a class past the end of the labels is named by its index.
    The one place that turns a model's output into what a person reads (inspect, the optimizer's
    record, the live view)."""
    v, i = p.topk(min(int(k), p.shape[-1]), dim=-1)
    labels = labels or []
    return [[(j, labels[j] if j < len(labels) else str(j), float(q)) for q, j in zip(vr, ir)]
            for vr, ir in zip(v.tolist(), i.tolist())]
