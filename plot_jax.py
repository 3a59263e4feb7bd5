"""
Draw the loss curves of a training run from the out_dir/metrics.csv that train_jax.py writes:
the training loss of every log line, the train and val losses of every evaluation, and the
learning rate, against iterations; below them HellaSwag's acc_norm, when the run scored it
(--hellaswag_interval).
$ python plot_jax.py --out_dir=out-shakespeare-char                   # writes out-shakespeare-char/loss.png
$ python plot_jax.py --out_dir=out-shakespeare-char --out_dir=out-b   # two runs, one over the other
"""
import argparse
import csv
import os

from configurator import die

parser = argparse.ArgumentParser(description="loss curves from out_dir/metrics.csv, written to the first out_dir/loss.png")
parser.add_argument('--out_dir', action='append', required=True, help="a run's out_dir; give it twice to compare two runs")
args = parser.parse_args()
if len(args.out_dir) > 2:
    die("plot_jax.py compares at most two runs: give --out_dir once or twice")

try:
    import matplotlib
except ImportError:
    die("plot_jax.py needs matplotlib: pip install matplotlib", code=1)
matplotlib.use('Agg')  # draw to a file, no display needed
import matplotlib.pyplot as plt


def read_metrics(out_dir):
    """{column: [(iter, value), ...]} of out_dir/metrics.csv, for the cells that have a value."""
    path = os.path.join(out_dir, 'metrics.csv')
    if not os.path.exists(path):
        die(f"{path} not found: train_jax.py writes it while training in out_dir")
    columns = {}
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k != 'iter' and v != '':
                    columns.setdefault(k, []).append((int(row['iter']), float(v)))
    return columns


runs = [read_metrics(d) for d in args.out_dir]
with_hellaswag = any('hellaswag_acc_norm' in run for run in runs)
fig, axes = plt.subplots(2 if with_hellaswag else 1, figsize=(8, 8 if with_hellaswag else 5.5), dpi=100,
                         layout='constrained', squeeze=False, height_ratios=[2, 1] if with_hellaswag else None)
loss_ax = axes[0, 0]
lr_ax = loss_ax.twinx()
names = [os.path.basename(os.path.abspath(d)) for d in args.out_dir]
for run, name, color in zip(runs, names, ('tab:blue', 'tab:orange')):
    label = lambda what: f'{name}: {what}' if len(names) > 1 else what
    for column, style, what in (('loss', dict(lw=0.8, alpha=0.4), 'train loss, each logged iteration'),
                                ('train_loss', dict(ls='--', marker='.'), 'train loss, evaluation'),
                                ('val_loss', dict(lw=2, marker='o'), 'val loss, evaluation')):
        if column in run:
            loss_ax.plot(*zip(*run[column]), color=color, label=label(what), **style)
    if 'lr' in run:  # logged at the log lines and the evaluations: once per iteration is enough
        lr_ax.plot(*zip(*sorted(set(run['lr']))), color=color, ls=':', lw=1, label=label('learning rate'))
    if 'hellaswag_acc_norm' in run:
        axes[1, 0].plot(*zip(*run['hellaswag_acc_norm']), color=color, marker='o', label=label('HellaSwag acc_norm'))
if with_hellaswag:
    axes[1, 0].set(xlabel='iteration', ylabel='HellaSwag acc_norm')
    axes[1, 0].grid(alpha=0.3)
    axes[1, 0].legend(fontsize='small')
loss_ax.set(xlabel='iteration', ylabel='loss', title=' vs '.join(names))
loss_ax.grid(alpha=0.3)
lr_ax.set(ylabel='learning rate', ylim=(0, None))
handles, labels = (a + b for a, b in zip(loss_ax.get_legend_handles_labels(), lr_ax.get_legend_handles_labels()))
fig.legend(handles, labels, loc='outside lower center', ncols=2, fontsize='small')
png = os.path.join(args.out_dir[0], 'loss.png')
fig.savefig(png)
print(f"wrote {png}")
