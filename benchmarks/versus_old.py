"""No-regression check: the step each benchmark times, old version against new, in ONE process.

    python -m benchmarks.versus_old --bench=train_step --old_worktree=/path/to/worktree --rounds=7
    python -m benchmarks.versus_old --bench=rollout|char|bandit ...

The old version is a git worktree of an earlier commit (`git worktree add /path 97a0231`). Its
packages (rlsoft, models, envs, experiments, benchmarks) are copied to `<old_copy>/oldv/` with their
absolute imports rewritten to `oldv.<package>`, so that both versions import side by side. For each
benchmark the script builds the exact step that benchmark's headline figure times, in each version,
on the same inputs, shapes and settings, checks that the two compute the same thing where they
should, warms (compiles) both, then times them interleaved: `rounds` rounds of one call each,
ABBA order (old first in even rounds, new first in odd ones). Reported: the median time of each,
and the paired ratio (median over rounds of the per-round time ratio new / old; its inverse is
the speed ratio old / new: >= 0.95 means within 5% of the old speed, or faster).

  train_step  the tiny RL update: 8 questions x G=8, 128 prompt + 256 response tokens, 4 micro-batches,
              softmax (tau 0.5), token_mean, PPO clip 0.2, 1 epoch, AdamW lr 1e-5. New: the Countdown
              testbed's `LanguageTestbed.update` (experiments.countdown.qwen2_policy). Old:
              trainer.make_update(train_forward, cfg, response_logits), as its benchmark built it.
              Both on the batch the new testbed's first RL step builds.
  train_step_testbed  the same update, the old side built as the new one is (its own LanguageTestbed):
              for old commits after the driver refactor, whose trainer API is the testbed's.
  rollout     the tiny sampler: 64 prompts of 113..128 tokens, 256 new tokens, segmented decode cache
              (chunk 64), G = 1; the same transformers-initialised weights, the same keys.
  char        the char testbed's compiled step: exhaustive_loop.make_train_chunk over
              experiments.char.build (cpu preset, 64 contexts x 32 characters, `chunk` steps per call).
  bandit      the compiled sweep (rlsoft.categorical.sweep, now rlsoft.bandit_sweep.sweep):
              seeds x arms x steps, G = 16, linear weights, SGD lr 3, seeds split over the host
              devices (XLA_FLAGS as benchmarks.bandit sets it).
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import sys

PACKAGES = ("rlsoft", "models", "envs", "experiments", "benchmarks")
_IMPORT = re.compile(r"^(\s*)(from|import)\s+(" + "|".join(PACKAGES) + r")(?=[\s.])", re.M)


def build_old_copy(worktree: str, dest: str) -> None:
    """Copy the worktree's packages to dest/oldv/ with `from|import <pkg>` rewritten to `oldv.<pkg>`."""
    root = os.path.join(dest, "oldv")
    if os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(root)
    open(os.path.join(root, "__init__.py"), "w").close()
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(worktree, pkg), os.path.join(root, pkg),
                        ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    text = f.read()
                new = _IMPORT.sub(lambda m: f"{m.group(1)}{m.group(2)} oldv.{m.group(3)}", text)
                if re.search(r"^\s*import oldv\.", new, re.M):  # `import pkg.x` would bind `oldv`
                    raise SystemExit(f"{path}: a plain `import <pkg>` needs a manual rewrite")
                if new != text:
                    with open(path, "w") as f:
                        f.write(new)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.versus_old")
    p.add_argument("--bench", required=True, choices=("train_step", "train_step_testbed", "rollout", "char", "bandit"))
    p.add_argument("--old_worktree", default="")
    p.add_argument("--old_copy", default="/tmp/oldv")
    p.add_argument("--rebuild", action="store_true", help="rebuild old_copy from old_worktree")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warm", type=int, default=2, help="untimed calls of each before timing")
    p.add_argument("--chunk", type=int, default=100, help="char: steps per call")
    p.add_argument("--text_file", default="/work/shared/data/tinyshakespeare.txt")
    p.add_argument("--seeds", type=int, default=64)
    p.add_argument("--arms", type=int, default=1000)
    p.add_argument("--steps", type=int, default=1000)
    return p.parse_args(argv)


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.bench == "bandit":  # before JAX starts, as benchmarks.bandit does
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={os.cpu_count() or 1}")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks.rollout (torch only builds weights)

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _max_abs(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _rel(a, b) -> float:
    return _max_abs(a, b) / max(float(np.max(np.abs(np.asarray(y)))) for y in jax.tree.leaves(b))


def _stepper(step, state, *args):
    box = [state]

    def run():
        box[0], metrics = step(box[0], *args)
        return jax.device_get(metrics)
    return run, box


# --------------------------------------------------------------------------------------------


def bench_train_step(args):
    from flax import nnx

    from benchmarks import train_step as nb
    from experiments.countdown import qwen2_policy
    from models import qwen2
    from rlsoft.train_loop import LanguageTestbed
    from oldv.models import qwen2 as oqwen2
    from oldv.models.qwen2_train import response_logits as o_response_logits, train_forward as o_train_forward
    from oldv.rlsoft import trainer as otrainer

    cfg = nb.BenchConfig(config="tiny", torch=False, rl_step=False, variants=False)
    mcfg = qwen2.Qwen2Config.preset("tiny")
    graphdef, params = nnx.split(qwen2.Qwen2(mcfg, rngs=nnx.Rngs(cfg.seed)))
    ograph, oparams = nnx.split(oqwen2.Qwen2(oqwen2.Qwen2Config.preset("tiny"), rngs=nnx.Rngs(cfg.seed)))
    check = {"init_params_max_abs_diff": _max_abs(oparams, params)}

    # New: the testbed's update, on the batch its first RL step builds (as benchmarks.train_step).
    tcfg = nb.train_config(cfg, cfg.micro_batches)
    testbed = LanguageTestbed(tcfg, qwen2_policy(graphdef), params, nb.RandomTask(cfg, mcfg.vocab_size, cfg.seed))
    keys = {s: jax.random.fold_in(jax.random.key(cfg.seed), i) for i, s in enumerate(testbed.streams)}
    batch = nb.first_rl_batch(testbed, keys)
    new_run, new_box = _stepper(testbed.update, testbed.init_state(), jax.device_put(batch))

    # Old: trainer.make_update as the old benchmark built it, same settings, the same batch.
    ucfg = otrainer.UpdateConfig(scheme="softmax", tau=0.5, learning_rate=cfg.learning_rate, warmup_steps=0,
                                 micro_batches=cfg.micro_batches, ppo_epochs=1, aggregation="token_mean",
                                 clip_eps=0.2)
    oupd = otrainer.make_update(o_train_forward(ograph), ucfg, o_response_logits(ograph))[0]
    obatch = otrainer.Batch(**batch._asdict())
    old_run, old_box = _stepper(oupd, otrainer.init_state(jax.tree.map(jnp.copy, oparams), ucfg),
                                jax.device_put(obatch))

    o1, n1 = old_run(), new_run()  # first update of each, from the same params
    check.update({
        "loss": {"old": float(o1["loss"]), "new": float(n1["train/loss"])},
        "grad_norm": {"old": float(o1["grad_norm"]), "new": float(n1["train/grad_norm"])},
        "params_after_first_update_rel_diff": _rel(new_box[0].params("policy"), old_box[0].params),
    })
    workload = dict(preset="tiny", questions=cfg.questions, group_size=cfg.group_size, prompt_len=cfg.prompt_len,
                    new_tokens=cfg.new_tokens, micro_batches=cfg.micro_batches,
                    batch_shapes={k: list(np.shape(v)) for k, v in batch._asdict().items()})
    return old_run, new_run, check, workload


def bench_train_step_testbed(args):
    """train_step's update with the old side built the way the new one is (its own LanguageTestbed,
    qwen2_policy and benchmarks.train_step workload): for old commits after the driver refactor."""
    from flax import nnx

    from benchmarks import train_step as nb
    from experiments.countdown import qwen2_policy
    from models import qwen2
    from rlsoft.train_loop import LanguageTestbed
    from oldv.benchmarks import train_step as ob
    from oldv.experiments.countdown import qwen2_policy as o_qwen2_policy
    from oldv.models import qwen2 as oqwen2
    from oldv.rlsoft.train_loop import LanguageTestbed as OLanguageTestbed

    def build(nb, qwen2, policy, Testbed):
        cfg = nb.BenchConfig(config="tiny", torch=False, rl_step=False, variants=False)
        mcfg = qwen2.Qwen2Config.preset("tiny")
        graphdef, params = nnx.split(qwen2.Qwen2(mcfg, rngs=nnx.Rngs(cfg.seed)))
        testbed = Testbed(nb.train_config(cfg, cfg.micro_batches), policy(graphdef), params,
                          nb.RandomTask(cfg, mcfg.vocab_size, cfg.seed))
        keys = {s: jax.random.fold_in(jax.random.key(cfg.seed), i) for i, s in enumerate(testbed.streams)}
        batch = nb.first_rl_batch(testbed, keys)
        return _stepper(testbed.update, testbed.init_state(), jax.device_put(batch)), params, batch, cfg

    (new_run, new_box), params, batch, cfg = build(nb, qwen2, qwen2_policy, LanguageTestbed)
    (old_run, old_box), oparams, obatch, _ = build(ob, oqwen2, o_qwen2_policy, OLanguageTestbed)
    check = {"init_params_max_abs_diff": _max_abs(oparams, params), "batch_max_abs_diff": _max_abs(
        tuple(obatch), tuple(batch))}
    o1, n1 = old_run(), new_run()
    check.update({
        "loss": {"old": float(o1["train/loss"]), "new": float(n1["train/loss"])},
        "grad_norm": {"old": float(o1["train/grad_norm"]), "new": float(n1["train/grad_norm"])},
        "params_after_first_update_rel_diff": _rel(new_box[0].params("policy"), old_box[0].params("policy")),
    })
    workload = dict(preset="tiny", questions=cfg.questions, group_size=cfg.group_size, prompt_len=cfg.prompt_len,
                    new_tokens=cfg.new_tokens, micro_batches=cfg.micro_batches)
    return old_run, new_run, check, workload


def bench_rollout(args):
    from flax import nnx

    from benchmarks import rollout as nr
    from models.qwen2_decode import decode_fns
    from rlsoft import rollout
    from oldv.benchmarks import rollout as orb
    from oldv.models import hf as ohf
    from oldv.models.qwen2_decode import decode_fns as o_decode_fns
    from oldv.rlsoft import rollout as orollout

    cfg = nr.BenchConfig(config="tiny")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hf")
        _, ours = nr.build_models("tiny", path, cfg.seed)
        old_ours = ohf.load_model(path)
    graphdef, state = nnx.split(ours)
    ograph, ostate = nnx.split(old_ours)
    tokens, mask = nr.make_prompts(cfg, cfg.batch, ours.cfg.vocab_size, cfg.seed)
    n = cfg.new_tokens
    new_fns, old_fns = decode_fns(graphdef, chunk=cfg.chunk), o_decode_fns(ograph, chunk=cfg.chunk)
    new_run = nr.jax_sample_fn(new_fns, state, tokens, mask, n, 1)  # keys key(0), key(1), ... in both
    old_run = orb.jax_sample_fn(old_fns, ostate, tokens, mask, n, 1)

    new_s = rollout.make_sampler(new_fns, rollout.SamplingConfig(max_new_tokens=n), 1)
    old_s = orollout.make_sampler(old_fns, orollout.SamplingConfig(max_new_tokens=n), 1)
    same = []
    for k in (12345, 777):
        a = np.asarray(old_s(ostate, tokens, mask, jax.random.key(k)).tokens)
        b = np.asarray(new_s(state, tokens, mask, jax.random.key(k)).tokens)
        first = np.argmax(a != b, axis=1).astype(float)
        first[(a == b).all(1)] = np.nan
        same.append({"frac_tokens_equal": float((a == b).mean()), "rows_identical": int((a == b).all(1).sum()),
                     "first_diff_position_median": float(np.nanmedian(first)) if np.isnan(first).sum() < len(first)
                     else None})
    check = {"params_max_abs_diff": _max_abs(ostate, state), "same_key_samples": same}
    workload = dict(preset="tiny", batch=cfg.batch, prompt_len=cfg.prompt_len, new_tokens=n, chunk=cfg.chunk,
                    group_size=1)
    return old_run, new_run, check, workload


def bench_char(args):
    import dataclasses

    from experiments import char as nexp
    from rlsoft import exhaustive_loop as xl, monitors
    from oldv.experiments import char as oexp
    from oldv.rlsoft import exhaustive_loop as oxl, monitors as omonitors

    ncfg = dataclasses.replace(nexp.CharConfig(), text_file=args.text_file, chunk=args.chunk, progress=False)
    old_fields = {f.name for f in dataclasses.fields(oexp.CharConfig)}
    shared = {f.name: getattr(ncfg, f.name) for f in dataclasses.fields(ncfg) if f.name in old_fields}
    shared = {k: v for k, v in shared.items() if k not in ("logdir",)}
    nested = "policy" in old_fields  # an old tree with the nested optimizer: the new tree's API
    if nested:
        shared["policy"] = type(oexp.CharConfig().policy)(**dataclasses.asdict(ncfg.policy))
        ocfg = oexp.CharConfig(**shared)
    else:  # learning_rate was flat then
        ocfg = oexp.CharConfig(**shared, learning_rate=ncfg.policy.learning_rate, grad_clip=ncfg.policy.grad_clip)
    check = {"old_config_defaults_differ_from_new": {
        k: [getattr(oexp.CharConfig(), k), getattr(nexp.CharConfig(), k)] for k in shared
        if k != "policy" and getattr(oexp.CharConfig(), k) != getattr(nexp.CharConfig(), k)},
        "new_optimizer": dataclasses.asdict(ncfg.policy)}

    data, params, fns = nexp.build(ncfg)
    odata, oparams, otask = oexp.build(ocfg)
    check["init_params_max_abs_diff"] = _max_abs(oparams, params)
    mon, omon = monitors.MonitorConfig(), omonitors.MonitorConfig()
    data_key, explore_key = jax.random.key(1), jax.random.key(2)
    new_run, _ = _stepper(xl.make_train_chunk(fns, ncfg, mon, args.chunk), xl.init_state(params, ncfg, mon),
                          data_key, explore_key)
    old_keys = (data_key, explore_key) if nested else (jax.random.key(1),)
    old_run, _ = _stepper(oxl.make_train_chunk(otask, ocfg, omon, args.chunk), oxl.init_state(oparams, ocfg, omon),
                          *old_keys)

    # One step of each on the same batch (the key is used only by the sampled mode).
    contexts, targets = fns.batch_fn(jax.random.key(3))
    nst, nm = jax.jit(lambda s, k: xl.train_step(s, (contexts, targets), k, task=fns, cfg=ncfg, monitor_cfg=mon))(
        xl.init_state(params, ncfg, mon), jax.random.key(4))
    ng = jax.jit(jax.grad(lambda p: xl.step_loss(p, p, contexts, targets, jax.random.key(4), fns, ncfg)[0]))(params)
    if nested:
        ost, om = jax.jit(lambda s, k: oxl.train_step(s, (contexts, targets), k, task=otask, cfg=ocfg,
                                                      monitor_cfg=omon))(oxl.init_state(oparams, ocfg, omon),
                                                                         jax.random.key(4))
        og = jax.jit(jax.grad(lambda p: oxl.step_loss(p, p, contexts, targets, jax.random.key(4), otask,
                                                      ocfg)[0]))(oparams)
        old_loss, old_grad_norm, old_params = om["train/loss"], om["train/grad_norm"], ost.params("policy")
    else:
        fixed = otask._replace(batch_fn=lambda key: (contexts, targets))
        ost, om = jax.jit(lambda s, k: oxl.train_step(s, k, task=fixed, cfg=ocfg, monitor_cfg=omon))(
            oxl.init_state(oparams, ocfg, omon), jax.random.key(4))
        og = jax.jit(jax.grad(lambda p: oxl._loss(p, p, contexts, targets, jax.random.key(4), fixed, ocfg)[0]))(oparams)
        old_loss, old_grad_norm, old_params = om["loss"], om["grad_norm"], ost.params
    check["grads_same_batch_rel_diff"] = _rel(ng, og)
    check["one_step_same_batch"] = {
        "loss": {"old": float(old_loss), "new": float(nm["train/loss"])},
        "grad_norm": {"old": float(old_grad_norm), "new": float(nm["train/grad_norm"])},
        "params_after_rel_diff": _rel(nst.params("policy"), old_params)}
    workload = dict(model_preset=ncfg.model_preset, batch=ncfg.batch_size, context=ncfg.context, chunk=args.chunk,
                    scheme=ncfg.scheme, mixing=ncfg.mixing, clip_eps=ncfg.clip_eps, mode=ncfg.mode)
    return old_run, new_run, check, workload


def bench_bandit(args):
    from envs import bandit as nenv
    from rlsoft import bandit_sweep
    from rlsoft.sharding import make_mesh, shard_batch
    from oldv.envs import bandit as oenv
    from oldv.rlsoft.sharding import make_mesh as o_make_mesh, shard_batch as o_shard_batch

    try:  # the bandit trainer's module: rlsoft.bandit_sweep since c3aa3de, rlsoft.categorical before it
        old_sweep = importlib.import_module("oldv.rlsoft.bandit_sweep")
    except ModuleNotFoundError:
        old_sweep = importlib.import_module("oldv.rlsoft.categorical")

    seeds, arms, steps, g, lr = args.seeds, args.arms, args.steps, 16, 3.0
    best = np.random.default_rng(0).integers(0, arms, size=seeds)

    def build(sweep_mod, env_mod, mesh_fn, shard_fn):
        keys = jax.random.split(jax.random.PRNGKey(0), seeds)
        envs = env_mod.Bandit(jax.nn.one_hot(jnp.asarray(best), arms, dtype=jnp.float32), jnp.zeros((seeds,)))
        mesh = mesh_fn()
        if seeds % mesh.size == 0:
            envs, keys = shard_fn((envs, keys), mesh)
        hps = sweep_mod.make_hparams(["linear"], (), (lr,))
        kw = dict(num_actions=arms, num_steps=steps, reward_fn=env_mod.pull_noiseless, values_fn=env_mod.arm_values,
                  group_size=g, optimizer="sgd")
        compiled = sweep_mod.sweep.lower(hps, envs, keys, **kw).compile()
        return lambda: jax.device_get(compiled(hps, envs, keys))

    old_run = build(old_sweep, oenv, o_make_mesh, o_shard_batch)
    new_run = build(bandit_sweep, nenv, make_mesh, shard_batch)
    om, nm = old_run(), new_run()

    def metric(m, name):  # older trees name the metrics without their eval/ and train/ prefixes
        return np.asarray(m[name] if name in m else m[name.split("/", 1)[1]])

    op, np_ = metric(om, "eval/p_best")[0], metric(nm, "eval/p_best")[0]
    check = {"p_best_max_abs_diff": float(np.max(np.abs(op - np_))),
             "final_p_best_mean": {"old": float(op[:, -1].mean()), "new": float(np_[:, -1].mean())},
             "loss_max_abs_diff": float(np.max(np.abs(metric(om, "train/loss") - metric(nm, "train/loss")))),
             "metrics": {"old": len(om), "new": len(nm)}, "jax_devices": jax.device_count()}
    return old_run, new_run, check, dict(seeds=seeds, arms=arms, steps=steps, group_size=g, lr=lr)


# --------------------------------------------------------------------------------------------


def main(args) -> dict:
    sys.path.insert(0, args.old_copy)
    if args.rebuild or not os.path.isdir(os.path.join(args.old_copy, "oldv")):
        if not args.old_worktree:
            raise SystemExit("--old_worktree is required to build --old_copy")
        build_old_copy(args.old_worktree, args.old_copy)
    start = time.perf_counter()
    old_run, new_run, check, workload = globals()[f"bench_{args.bench}"](args)
    build_s = time.perf_counter() - start
    for _ in range(args.warm):  # compile / warm both (the new testbed's update compiles twice)
        old_run()
        new_run()
    load = [os.getloadavg()]
    times = {"old": [], "new": []}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for name in order:
            fn = old_run if name == "old" else new_run
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        load.append(os.getloadavg())
    old_t, new_t = np.asarray(times["old"]), np.asarray(times["new"])
    ratio = new_t / old_t
    out = {
        "bench": args.bench,
        "workload": workload,
        "check": check,
        "seconds_median": {"old": float(np.median(old_t)), "new": float(np.median(new_t))},
        "seconds_min": {"old": float(old_t.min()), "new": float(new_t.min())},
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "paired_time_ratio_new_over_old": float(np.median(ratio)),
        "speed_ratio_old_time_over_new_time": float(np.median(1 / ratio)),
        "per_round_ratio_new_over_old": [round(float(x), 3) for x in ratio],
        "within_5pct_or_better": bool(np.median(1 / ratio) >= 0.95),
        "load_avg_1min": {"start": load[0][0], "end": load[-1][0], "max": max(x[0] for x in load),
                          "mean": float(np.mean([x[0] for x in load]))},
        "build_and_check_s": round(build_s, 1),
        "jax_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(ARGS)
