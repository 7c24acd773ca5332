"""tf.distribute.MultiWorkerMirroredStrategy for the TensorFlow-side styles (keras, tensorflow): one
replica per worker process, each worker told its place by TF_CONFIG. The training loop is
`strategy.run` over a dataset from `distribute_datasets_from_function` (each worker's input pipeline
takes its shard of the rows, batched at the per-worker batch), with the gradients summed across the
workers by the optimizer and each replica's loss divided by the number of replicas, so the update is
the mean over the global batch. Keras' own `fit` is not used: under this strategy Keras 3's fit fails
before its first step (keras-team/keras#20585); the spec's callbacks keep Keras' meanings through the
plain loop's implementation (frameworks/base.py PlainCallbacks)."""
from __future__ import annotations

import math

import numpy as np

from parity.feeds import n_rows, take

from .base import History, PlainCallbacks, epoch_logs


def strategy(threads: int | None):
    """The strategy of this worker (TF_CONFIG names the cluster and its task), with TensorFlow's thread
    pools sized before anything runs: several workers share the machine's cores."""
    import tensorflow as tf
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    return tf.distribute.MultiWorkerMirroredStrategy()


def train_mirrored(strategy, t, x, y: np.ndarray, seed: int, *, workers: int, call, variables, loss_fn, opt,
                   get_weights, set_weights, on_epoch=None, val=None) -> tuple[History, list[int]]:
    """Train on this worker's shard in step with the others; returns the History (every worker holds the
    same one: the epoch's loss is summed across the workers) and the rows this worker was dealt.
    `call(x, training)` runs the model; `variables` are what it trains; `loss_fn(target, pred)` is the
    mean over a batch; model and optimizer were made inside `strategy.scope()`."""
    import tensorflow as tf
    from .distributed import per_worker_batch, shard_rows
    rank = strategy.cluster_resolver.task_id
    x = {k: np.asarray(v) for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)  # rows taken by index
    n = n_rows(x)
    bs = per_worker_batch(t.batch_size, n, workers)
    dealt = shard_rows(n, workers, rank)
    steps = math.ceil(len(dealt) / bs)  # the same on every worker: the shards are padded to one size

    def shard(context):
        # this input pipeline's rows: TensorFlow names the pipeline; the padding keeps every shard one size
        rows = shard_rows(n, context.num_input_pipelines, context.input_pipeline_id)
        ds = tf.data.Dataset.from_tensor_slices((take(x, rows), y[rows]))
        if t.shuffle:
            ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(bs).repeat()

    batches = iter(strategy.distribute_datasets_from_function(shard))

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, call(xb, True))
            scaled = loss / strategy.num_replicas_in_sync  # the optimizer sums the replicas' gradients
        grads = tape.gradient(scaled, variables)
        opt.apply_gradients(zip(grads, variables))
        rows = tf.cast(tf.shape(yb)[0], tf.float32)
        return tf.stack([loss * rows, rows])

    @tf.function
    def epoch(iterator, steps):
        summed = tf.zeros([2])
        for _ in tf.range(steps):
            xb, yb = next(iterator)
            summed += strategy.reduce("SUM", strategy.run(replica_step, args=(xb, yb)), axis=None)
        return summed

    @tf.function(reduce_retracing=True)
    def evaluate(xv, yv):
        return loss_fn(yv, call(xv, False))

    history = History()
    callbacks = PlainCallbacks(t, history, get_weights=get_weights, set_weights=set_weights,
                               get_lr=lambda: float(np.asarray(opt.learning_rate)),
                               set_lr=lambda lr: opt.learning_rate.assign(lr))
    for number in range(1, t.epochs + 1):
        total, count = (float(v) for v in epoch(batches, tf.constant(steps)).numpy())
        history.loss.append(total / count)
        if val is not None:  # every worker scores the whole held-out set: their callbacks decide alike
            history.val_loss.append(float(evaluate(val[0], tf.constant(val[1]))))
        stop = callbacks.epoch_end(number, epoch_logs(history))
        if on_epoch and rank == 0:
            on_epoch(number, history.loss[-1])
        if stop:
            break
    callbacks.train_end()
    return history, [int(r) for r in dealt]
