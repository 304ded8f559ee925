"""
Where does the DINO head's output live relative to its prototypes? A diagnostic of the "uniform" failure of SSL.

The DINO head ends in an L2-normalized bottleneck z and K unit-norm prototypes w_k; its logits are the cosines
z . w_k (Method §3). If the prototypes leave some directions of the bottleneck nearly empty and z moves into them,
every cosine is near 0 and both the teacher's and the student's softmaxes are flat: the loss sits near log K although
nothing has collapsed to one prototype. This script loads a stage-1 checkpoint, runs its *teacher* (trunk + head) on
built-in val scenes and prints, along the right singular directions of the prototype matrix (strongest first):

    proto   the prototypes' share of energy in that direction (1/bottleneck each if they were spread evenly)
    z       the bottleneck outputs' mean share of energy in that direction

then the entropies of softmax(z . w / T) before Sinkhorn-Knopp or centering at the student and teacher temperatures,
next to the entropy a random unit z would get from the same prototypes, and the mean cosine of z between scenes of the
same shape and of different shapes. For a run with a centred teacher (`--loss.teacher_norm=centering`, the tiny default)
it also prints what centering guards against, collapse onto a few prototypes: the mean entropy of the centred targets,
the entropy of their mean over the scenes (log K if every prototype gets the same mass, 0 if all go to one), and how
many prototypes are some scene's strongest.

    python scripts/ssl_head_diagnostic.py --ckpt=runs/pretrain
    python scripts/ssl_head_diagnostic.py --ckpt=runs/pretrain/ckpt_0000100.pt --images=1000
"""

import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import labelled_images  # noqa: E402
from losses import mean_entropy  # noqa: E402
from model import VTP, Config, ConfigError, DINOHead, resolve_checkpoint, run_cli, seeded  # noqa: E402


def direction_energy(z, w):
    """
    Unit rows z (N, d) and prototype rows w (K, d) -> (proto (d,), z (d,)): the share of the prototypes' energy and
    the mean share of each z's energy along the right singular directions of w, strongest first. Each sums to 1.
    """
    w = F.normalize(w.float(), dim=-1)
    _, s, vh = torch.linalg.svd(w, full_matrices=True)
    s = torch.cat([s, s.new_zeros(w.shape[1] - len(s))])  # K < d: the missing directions hold no prototype energy
    proj = (F.normalize(z.float(), dim=-1) @ vh.t()) ** 2  # (N, d), each row sums to 1
    return s ** 2 / (s ** 2).sum(), proj.mean(dim=0)


def entropy(logits, temp):
    """Mean entropy (nats) of softmax(logits / temp) over the rows of (N, K) logits."""
    logp = F.log_softmax(logits.float() / temp, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean().item()


def target_stats(logits, center, temp):
    """Centred teacher targets softmax((logits - center) / temp) of (N, K) logits -> (mean entropy of the rows,
    entropy of their mean, number of distinct argmax prototypes), in nats."""
    p = F.softmax((logits.float() - center) / temp, dim=-1)
    row, marginal = mean_entropy(p).item(), mean_entropy(p.mean(dim=0, keepdim=True)).item()
    return row, marginal, len(p.argmax(dim=-1).unique())


def teacher_outputs(path, n):
    """The checkpoint's config and its teacher's normalized bottleneck outputs z (N, d) of the [CLS] of n val scenes,
    with their labels (N,) and the prototypes (K, d)."""
    path = resolve_checkpoint(path, f"no stage-1 checkpoint (ckpt_*.pt) at {path!r}: run pretrain.py first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "teacher" not in ckpt or "config" not in ckpt:
        raise ConfigError(f"--ckpt: {path!r} is not a stage-1 checkpoint of pretrain.py (it has no teacher)")
    cfg = Config.from_dict(ckpt["config"])
    feat_dim = cfg.encoder.latent_dim if cfg.encoder.latent_features else cfg.encoder.width  # as in Student
    vtp, head = VTP(cfg).eval(), DINOHead(feat_dim, cfg.head).eval()
    for prefix, module in (("trunk.", vtp.trunk), ("dino_head.", head)):  # the Teacher's state_dict of pretrain.py
        module.load_state_dict({k[len(prefix):]: v for k, v in ckpt["teacher"].items() if k.startswith(prefix)})
    x, y = labelled_images(cfg, "val", cfg.encoder.image_size, n)
    with torch.no_grad():
        cls = vtp.trunk.forward_features(x)["cls"]
        if vtp.latent_features:  # as the Teacher of pretrain.py
            cls = vtp.trunk.feature_bottleneck(cls)
        z = F.normalize(head.mlp(cls), dim=-1)
    return cfg, path, z, y, head.last_layer.weight.detach(), ckpt["teacher"].get("center_cls.center")


def report(path, n=500, seed=0):
    cfg, path, z, y, w, center = teacher_outputs(path, n)
    proto, zshare = direction_energy(z, w)
    wn = F.normalize(w.float(), dim=-1)
    with seeded(seed):
        z_rand = F.normalize(torch.randn_like(z), dim=-1)
    cos = z @ z.t()
    off = ~torch.eye(len(y), dtype=torch.bool)
    same = (y[:, None] == y[None]) & off
    temps = {"student": cfg.loss.student_temp, "teacher": cfg.loss.teacher_temp}
    centred = None
    if cfg.loss.teacher_norm == "centering":
        centred = dict(zip(("entropy", "marginal_entropy", "prototypes_used"),
                           target_stats(z @ wn.t(), center, cfg.loss.teacher_temp)))
    return {"centred_targets": centred, "ckpt": path, "images": len(y), "log_k": math.log(w.shape[0]),
            "proto_energy": proto.tolist(), "z_energy": zshare.tolist(),
            "entropy": {name: entropy(z @ wn.t(), t) for name, t in temps.items()},
            "entropy_random_z": {name: entropy(z_rand @ wn.t(), t) for name, t in temps.items()},
            "cos_same_shape": cos[same].mean().item(), "cos_other_shape": cos[off & ~same].mean().item()}


def main(argv=None):
    opts = {"ckpt": "runs/pretrain", "images": 500}
    for arg in sys.argv[1:] if argv is None else argv:
        key, _, val = arg.lstrip("-").partition("=")
        if key not in opts or not val:
            raise ConfigError(f"unknown or empty option {arg!r}; options: --ckpt=PATH --images=N")
        opts[key] = val if key == "ckpt" else int(val)
    r = report(opts["ckpt"], opts["images"])
    print(f"{r['ckpt']}: teacher on {r['images']} val scenes, log K = {r['log_k']:.3f}")
    print("direction  proto   z")
    for i, (p, e) in enumerate(zip(r["proto_energy"], r["z_energy"])):
        print(f"{i:9d}  {p:5.3f}  {e:5.3f}")
    for name in ("student", "teacher"):
        print(f"entropy at the {name} temperature (before Sinkhorn-Knopp or centering): "
              f"{r['entropy'][name]:.3f} nats; a random unit z: {r['entropy_random_z'][name]:.3f}")
    print(f"cosine of z: same shape {r['cos_same_shape']:.3f}, other shapes {r['cos_other_shape']:.3f}")
    if r["centred_targets"]:
        c = r["centred_targets"]
        print(f"centred teacher targets: {c['entropy']:.3f} nats each, {c['marginal_entropy']:.3f} nats for their "
              f"mean; {c['prototypes_used']} of {round(math.exp(r['log_k']))} prototypes are some scene's strongest")


if __name__ == "__main__":
    run_cli(main)
