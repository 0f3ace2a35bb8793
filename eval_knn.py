"""Weighted k-NN evaluation and embedding-norm summaries for any normssl checkpoint.

    python eval_knn.py runs/<run>/last.pt
    python eval_knn.py runs/<run>/last.pt --space projector --k 20

The classic SSL protocol (Wu et al. 2018, as used by the SimSiam / MoCo code bases):
embed train and test images without augmentation, L2-normalize, and let each test
image's k=200 most cosine-similar train images vote with weight exp(sim / T), T=0.1.
The building blocks (embed, knn_predict, norm_summary, load_model) are importable.
"""
import argparse
import importlib
import json
import sys

import torch
import torch.nn.functional as F

import common


@torch.no_grad()
def embed(model, x, mean, std, space="backbone", batch_size=1024):
    """Features of uint8 images x (N, 3, H, W) in the given space, as float32 (N, D)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        batch = common.normalize(x[i: i + batch_size].to(device), mean, std)
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with common.autocast(device):
            out.append(common.features(model, batch, space).float())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_predict(train_f, train_y, test_f, num_classes, k=200, t=0.1, chunk=1024):
    """Weighted k-NN labels for test_f (M, D) from train_f (N, D); chunked over the queries
    so a 50k x 10k similarity matrix never has to exist at once."""
    train_f = F.normalize(train_f, dim=1)
    k = min(k, len(train_f))
    preds = []
    for i in range(0, len(test_f), chunk):
        sim = F.normalize(test_f[i: i + chunk], dim=1) @ train_f.T  # (m, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        weight = (top_sim / t).exp()
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[top_idx], weight)  # (m, C) weighted class votes
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_eval(model, data, mean, std, k=200, t=0.1, space="backbone"):
    """k-NN top-1 accuracy (%) of the model's features on data's test set."""
    train_f = embed(model, data.train_x, mean, std, space)
    test_f = embed(model, data.test_x, mean, std, space)
    pred = knn_predict(train_f, data.train_y.to(train_f.device), test_f, data.num_classes, k, t)
    return 100.0 * (pred == data.test_y.to(pred.device)).float().mean().item()


def norm_summary(feats, labels, num_classes):
    """Mean and std of the embedding norm, overall and per class."""
    norms = feats.norm(dim=1).cpu()
    labels = labels.cpu()
    per_class = []
    for c in range(num_classes):
        n = norms[labels == c]
        per_class.append({"class": c, "count": len(n), "mean": n.mean().item() if len(n) else float("nan"),
                          "std": n.std().item() if len(n) > 1 else float("nan")})
    return {"mean": norms.mean().item(), "std": norms.std().item(), "per_class": per_class}


def load_model(path, device="cpu"):
    """Rebuild a trained network from a checkpoint alone; returns (model, checkpoint)."""
    ckpt = common.load_checkpoint(path)
    module = importlib.import_module(ckpt["method"])  # the script that wrote it, e.g. simclr.py
    fields = {f for f in module.Args.__dataclass_fields__}
    args = module.Args(**{k: v for k, v in ckpt["args"].items() if k in fields})
    model = module.build_model(args, ckpt["img_size"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise common.UsageError(f"{path} does not match the {ckpt['method']} network it names "
                                f"({str(e).splitlines()[0]})")
    return model.to(device), ckpt


def main(argv=None):
    p = argparse.ArgumentParser(description="Weighted k-NN top-1 and embedding-norm summary of a checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a last.pt or epoch<N>.pt written by one of the method scripts")
    p.add_argument("--k", type=int, default=200, help="neighbours that vote")
    p.add_argument("--t", type=float, default=0.1, help="temperature of the exp(sim / T) vote weights")
    p.add_argument("--space", default="backbone", choices=("backbone", "projector", "predictor"),
                   help="which features to use: backbone h, projector z or predictor p")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the one the run used)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    a = p.parse_args(argv)
    if a.k < 1 or a.t <= 0:
        p.error("--k must be >= 1 and --t must be positive")
    device = common.pick_device(a.device)
    model, ckpt = load_model(a.checkpoint, device)
    run = ckpt["args"]
    data = common.load_dataset(run["dataset"], a.data_dir or run["data_dir"], False, run.get("subset", 0)).to(device)
    mean, std = ckpt["data_stats"]
    train_f = embed(model, data.train_x, mean, std, a.space)
    test_f = embed(model, data.test_x, mean, std, a.space)
    pred = knn_predict(train_f, data.train_y, test_f, data.num_classes, a.k, a.t)
    top1 = 100.0 * (pred == data.test_y).float().mean().item()
    result = {"checkpoint": a.checkpoint, "method": ckpt["method"], "epoch": ckpt["epoch"], "space": a.space,
              "k": a.k, "t": a.t, "knn_top1": top1,
              "norms": {"train": norm_summary(train_f, data.train_y, data.num_classes),
                        "test": norm_summary(test_f, data.test_y, data.num_classes)}}
    print(f"{ckpt['method']} epoch {ckpt['epoch']} on {run['dataset']}: weighted {a.k}-NN top-1 = {top1:.2f}% "
          f"({a.space} features)")
    print(f"{'split':<6} {'mean norm':>10} {'std':>10}")
    for split in ("train", "test"):
        s = result["norms"][split]
        print(f"{split:<6} {s['mean']:>10.4f} {s['std']:>10.4f}")
    print(f"{'class':>5} {'train n':>8} {'train norm':>11} {'test norm':>10}")
    for tr, te in zip(result["norms"]["train"]["per_class"], result["norms"]["test"]["per_class"]):
        print(f"{tr['class']:>5} {tr['count']:>8} {tr['mean']:>11.4f} {te['mean']:>10.4f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    common.cli(main)
