"""Short recipe probes for the Megapixel MNIST CPU configuration (one torch thread).

Trains the shipped CPU configuration with the given overrides for LIMIT seconds of training
time (evaluation excluded), at a constant learning rate after 50 warm-up steps, and prints the
metrics of the first 240 validation images every 120 s as JSON lines. Two probes run side by
side on the two cores. Data: /tmp/mm.npz from `ips make-mnist --out /tmp/mm.npz --mnist
../shared/data/mnist.npz --train 5000 --test 1000 --canvas 500 --noise 6 --seed 0`.

    python benchmarks/megapixel_mnist_cpu/probe.py NAME LIMIT [key=value ...]
"""

import sys, time, json, torch, numpy as np, ips
from ips.config import load_config
from ips.data import build_dataset
from ips.train import parameter_groups, make_loader, evaluate, _forward
name, limit, *over = sys.argv[1:]
limit = float(limit)
torch.set_num_threads(1)
cfg = load_config('configs/megapixel_mnist_cpu.yaml', ['data.path=/tmp/mm.npz'] + over)
ds = build_dataset(cfg, 'train'); val = build_dataset(cfg, 'val')
val = torch.utils.data.Subset(val, range(240))
torch.manual_seed(0)
m = ips.create_model(cfg)
opt = torch.optim.AdamW(parameter_groups(m, cfg.train), lr=cfg.train.lr)
sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
g = torch.Generator().manual_seed(0)
vl = make_loader(val, cfg, shuffle=False, batch_size=16)
clock = 0.0; step = 0; marks = [120 * k for k in range(1, 100)]; out_rows = []
epoch = 0
while clock < limit:
    for batch in make_loader(ds, cfg, shuffle=True, epoch=epoch):
        t = time.perf_counter()
        m.train()
        out, loss, _ = _forward(m, batch, torch.device('cpu'), g, 'none')
        opt.zero_grad(); loss.backward()
        if cfg.train.grad_clip: torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.train.grad_clip)
        opt.step(); sch.step(); step += 1
        clock += time.perf_counter() - t
        if clock >= marks[0] or clock >= limit:
            marks.pop(0)
            r = evaluate(m, vl, device=torch.device('cpu'))
            row = dict(name=name, step=step, clock=round(clock), loss=round(loss.item(), 3),
                       **{k: round(v, 3) for k, v in r.items() if k.endswith('accuracy') or ('foreground' in k or 'entropy' in k or 'exact' in k)})
            print(json.dumps(row), flush=True)
            if clock >= limit: break
    epoch += 1
