"""Issue #13 screen: transforms of the released synthetic set that the DP classifier relabels.

The release's G and its DP label classifier are both charged releases, so any function of them is
post-processing. This screen draws the set exactly as a release does (`release.sample_synthetic`), then
changes a fraction P of its images and labels each changed image by the classifier's argmax:

    shift:P            translate by a random integer offset in [-2, 2]² (zeros, i.e. -1, fill)
    flip:P             mirror left–right
    pixmix:P           x = (1−λ)·x_i + λ·x_j, λ ~ U(0, 1), j another image of the set (mixup in pixels)
    disagree:P:R       (first in a chain) a fraction P of the set replaced by the images, out of a fresh pool R times as large,
                       on which a proxy student (the classifier's architecture, twice as wide, trained one
                       epoch without noise on the set: post-processing) agrees least with the classifier,
                       an even number per label (adversarial distillation's lesson: Micaelli & Storkey,
                       "Zero-shot Knowledge Transfer via Adversarial Belief Matching", NeurIPS 2019)
    boundary:P:K:A     K steps of L2 length A on each image against its top-2 logit gap (the classifier's
                       own boundary: Heo et al., "Knowledge Distillation with Adversarial Samples
                       Supporting Decision Boundary", AAAI 2019), clamped to the image range

Scores with the evaluate command's defaults (60k images, synthetic seed 3, the fixed CNN, the real
test split): downstream accuracy and the diversity ratio.

    python bench/refine_screen.py RUN_DIR [RUN_DIR ...] --transform none pixmix:0.5+boundary:0.5:3:1 --out FILE.jsonl

Transforms chain with "+". --real-teacher also scores the real training images labelled by the classifier
(a diagnostic of what G's images cost the student; it reads private data, so its number stays with the operator).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpaf_ray.data import ImageDataset, load_dataset  # noqa: E402
from dpaf_ray.models.architecture import architecture_for  # noqa: E402
from dpaf_ray.models.generator import ConditionalGenerator, load_generator  # noqa: E402
from dpaf_ray.release import labelled_draw, least_certain, sample_synthetic  # noqa: E402
from dpaf_ray.models.label_classifier import LabelClassifier  # noqa: E402
from screen import score_and_log  # noqa: E402  (bench/ is on sys.path when a script runs)


def label_with_classifier(generator: ConditionalGenerator, x: torch.Tensor, batch: int) -> torch.Tensor:
    """The argmax labels that the generator's DP label classifier gives images, on the CPU."""
    return torch.cat([torch.empty(0, dtype=torch.long)] +
                     [generator.labeller(x[i:i + batch].to(generator.device)).argmax(1).cpu()
                      for i in range(0, len(x), batch)])


def towards_boundary(generator: ConditionalGenerator, x: torch.Tensor, batch: int, steps: int,
                     length: float) -> torch.Tensor:
    """x after `steps` steps of L2 length `length` that shrink the gap between the generator's
    classifier's two largest logits, kept in the image range [-1, 1]."""
    out = [torch.empty(0, *x.shape[1:])]
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(generator.device)
        for _ in range(steps):
            with torch.enable_grad():
                xb.requires_grad_(True)
                top2 = generator.labeller(xb).topk(2, dim=1).values
                (grad,) = torch.autograd.grad((top2[:, 0] - top2[:, 1]).sum(), xb)
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            xb = (xb.detach() - length * grad / norm).clamp(-1, 1)
        out.append(xb.cpu())
    return torch.cat(out)


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    out = torch.full_like(x, -1.0)
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    size = x.shape[-1]
    offsets = torch.randint(0, 5, (len(x), 2), generator=g)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = pad[i, :, dy:dy + size, dx:dx + size]
    return out


def proxy_student(x: torch.Tensor, labels: torch.Tensor, classifier, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    student = LabelClassifier(architecture_for(tuple(x.shape[1:])), classifier.head.out_features, 2 * classifier.width,
                              4 * classifier.hidden_dim)
    opt = torch.optim.Adam(student.parameters(), 1e-3)
    order = torch.randperm(len(x))
    for i in range(0, len(x), 128):
        idx = order[i:i + 128]
        loss = torch.nn.functional.cross_entropy(student(x[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval()


def disagree(generator, x, labels, fraction: float, ratio: float, seed: int):
    student = proxy_student(x, labels, generator.labeller, seed)
    m = round(len(x) * fraction)
    with torch.no_grad():
        pool, pool_labels, _ = labelled_draw(generator, int(ratio * m), torch.Generator().manual_seed(seed + 7), 500)
        agree = torch.cat([student(pool[i:i + 1000]).log_softmax(1).gather(1, pool_labels[i:i + 1000, None])[:, 0]
                           for i in range(0, len(pool), 1000)])
    pick = least_certain(pool_labels, agree.exp(), m, generator.num_classes)
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 11))[m:]
    return torch.cat([x[keep], pool[pick].clamp(-1, 1)]), torch.cat([labels[keep], pool_labels[pick]])


def transform(spec: str, x: torch.Tensor, labels: torch.Tensor, generator, seed: int):
    """`spec` is one transform or several joined by '+', applied in turn; the release's classifier
    (`generator.labeller`) relabels every changed image, with the release's own code."""
    if spec == "none":
        return x, labels
    if "+" in spec:
        for i, part in enumerate(spec.split("+")):
            x, labels = transform(part, x, labels, generator, seed + 100 * i)
        return x, labels
    name, *params = spec.split(":")
    g = torch.Generator().manual_seed(seed + 1)
    pick = torch.rand(len(x), generator=g) < float(params[0])
    xs = x[pick]
    if name == "shift":
        xs = shift(xs, g)
    elif name == "flip":
        xs = xs.flip(-1)
    elif name == "pixmix":
        partner = x[torch.randint(len(x), (len(xs),), generator=g)]
        lam = torch.rand(len(xs), 1, 1, 1, generator=g)
        xs = (1 - lam) * xs + lam * partner
    elif name == "disagree":
        raise SystemExit("disagree must come first in a spec: it needs the generator")
    elif name == "boundary":
        xs = towards_boundary(generator, xs, 1000, int(params[1]), float(params[2]))
    else:
        raise SystemExit(f"unknown transform {spec!r}: use none, shift:P, flip:P, pixmix:P or boundary:P:K:A")
    x, labels = x.clone(), labels.clone()
    with torch.no_grad():
        x[pick], labels[pick] = xs, label_with_classifier(generator, xs, 1000)
    return x, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--transform", nargs="+", default=["none"])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--sample-seed", type=int, default=3)
    ap.add_argument("--num-synthetic", type=int, default=60_000)
    ap.add_argument("--real-teacher", action="store_true",
                    help="diagnostic: score the real training images labelled by the classifier (G's images' cost)")
    ap.add_argument("--out", default=None, help="append one JSON line per (run, transform) to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    test, train = load_dataset(args.dataset, "test"), load_dataset(args.dataset, "train")
    for run in args.runs:
        generator = load_generator(run)
        if generator.labeller is None:
            print(f"{run}: no label classifier in the release, skipped")
            continue
        x, labels = sample_synthetic(generator, args.num_synthetic, seed=args.sample_seed)
        for spec in args.transform:
            start = time.time()
            xt, lt, rest = x.clamp(-1, 1), labels, spec
            if spec.startswith("disagree:"):
                first, _, rest = spec.partition("+")
                _, frac, ratio = first.split(":")
                xt, lt = disagree(generator, xt, lt, float(frac), float(ratio), args.sample_seed)
            xt, lt = transform(rest or "none", xt, lt, generator, args.sample_seed)
            images = ((xt.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            synthetic = ImageDataset(images, lt, generator.num_classes, "synthetic")
            score_and_log(synthetic, test, train, start, args.out, run=run, transform=spec,
                          changed_labels=int((lt != labels).sum()))
        if args.real_teacher:
            start = time.time()
            with torch.no_grad():
                labels_of_real = label_with_classifier(generator, train.as_float(), 1000)
            relabelled = ImageDataset(train.images, labels_of_real, train.num_classes, "real, the classifier's labels")
            score_and_log(relabelled, test, train, start, args.out, run=run, transform="real train images, classifier labels")


if __name__ == "__main__":
    main()
