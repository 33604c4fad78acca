"""The MLflow contract: every tag, metric and artifact name the sweeps write and the reports read.

A leaf: it imports nothing of the project (reports import it without importing sweeps or models,
sweeps write through it), so a name exists once in the tree. Params are the flattened config keys
(``models.configkit.flatten``: ``model.attention.name``, ``train.lr``, ...) and are not repeated here,
except the two a researcher groups runs by (:data:`PARAM_CELL`, :data:`PARAM_SEED`).

Layout of a sweep in MLflow (docs/tracking.md describes each name):

* one **parent run** per sweep (tag ``sweep.role=parent``): the plan (``sweep.trials``,
  ``sweep.cells``), progress (``sweep.status``, ``sweep.pending``, ``sweep.failed``) and the
  sweep-level metrics (``sweep/...``);
* one **trial run** per (cell, seed) (``sweep.role=trial``; Optuna's search runs ``search``), a child
  of the parent: tags ``trial.*``, ``cell.*``, ``eval.metric``, ``mechanism.*``, ``failure.*``; params
  = the trial's whole flat config; per-epoch metrics ``eval/*``, ``train/*``, ``time/*``, ``best/*``;
  artifacts ``eval/predictions.csv``, ``eval/examples_top5.json``, ``stats/attention_heads.csv``.

Runs logged before this module existed also carry the alias tags ``variant`` (= ``trial.cell``) and
``seed`` (= ``trial.seed``); new runs do not, and :data:`LEGACY_ALIASES` tells a reader where to look.
"""

from __future__ import annotations

# ---- tags: sweep (parent and trial runs) ---------------------------------------------------------
SWEEP_ID = "sweep.id"
SWEEP_ROLE = "sweep.role"  # parent | trial | search
ROLE_PARENT, ROLE_TRIAL, ROLE_SEARCH = "parent", "trial", "search"
SWEEP_STATUS = "sweep.status"  # running | complete | interrupted | failed
SWEEP_TRIALS = "sweep.trials"  # JSON list of trial keys, the plan
SWEEP_CELLS = "sweep.cells"  # JSON {cell: {label, table}}: the cells this sweep runs
SWEEP_PENDING = "sweep.pending"  # JSON {trial key: reason}
SWEEP_FAILED = "sweep.failed"  # JSON {trial key: cause}
SWEEP_PRESET = "sweep.preset"
SWEEP_GRID = "sweep.grid"
SWEEP_SEARCH = "sweep.search"
SWEEP_RUNS_DIR = "sweep.runs_dir"
SWEEP_FINGERPRINT = "sweep.fingerprint"
GIT_COMMIT = "git.commit"
GIT_DIRTY = "git.dirty"
#: MLflow's own tag that makes a run a child of another in the UI.
PARENT_RUN = "mlflow.parentRunId"
#: MLflow 3's experiment tag behind the UI's "GenAI apps & agents" / "Model training" switch; with
#: ``custom_model_development`` the experiment opens on its runs table, not the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# ---- tags: one trial run ---------------------------------------------------------------------------
TRIAL_KEY = "trial.key"  # "<cell>-s<seed>"
TRIAL_CELL = "trial.cell"
TRIAL_SEED = "trial.seed"
TRIAL_AXES = "trial.axes"
TRIAL_ATTEMPT = "trial.attempt"
TRIAL_EXECUTOR = "trial.executor"
TRIAL_WORLD_SIZE = "trial.world_size"
TRIAL_DEVICE = "trial.device"
TRIAL_PRECISION = "trial.precision"
TRIAL_HOSTNAME = "trial.hostname"
TRIAL_NODE_IP = "trial.node_ip"
TRIAL_NODE_ID = "trial.node_id"
CELL_LABEL = "cell.label"
CELL_TABLE = "cell.table"
EVAL_METRIC_TAG = "eval.metric"  # official | soft_score: what eval/acc is
#: The question types on which the best epoch's model is no better than the question-type prior
#: (with its accuracy and the prior's), or ``none``; beside the metric ``eval/at_prior_share``.
EVAL_AT_PRIOR = "eval.at_prior"
FAILURE_REASON = "failure.reason"
FAILURE_KIND = "failure.kind"  # diverged | config | checkpoint | killed | error
MECHANISM_ENGAGED = "mechanism.engaged"  # JSON {mechanism: bool}
MECHANISM_EVIDENCE = "mechanism.evidence"  # JSON {mechanism: sentence}

#: New name -> the alias tag older runs carry with the same value.
LEGACY_ALIASES = {TRIAL_CELL: "variant", TRIAL_SEED: "seed"}

# ---- params a researcher groups runs by (the MLflow runs table's Group-by) -----------------------
PARAM_CELL = "cell"
PARAM_SEED = "train.seed"

# ---- metrics ---------------------------------------------------------------------------------------
#: Namespaces of the trial's last stage (sweeps/loop.py); an earlier stage <s> logs under ``<s>/``,
#: ``<s>/eval_`` and ``<s>/layers/`` with its epoch counter :func:`stage_epoch` instead.
TRAIN_NS, EVAL_NS, LAYERS_NS = "train/", "eval/", "layers/"
TIME_NS = "time/"
EPOCH = "epoch"
#: The pretraining stage's name (its metrics are ``pretrain/*``).
PRETRAIN_STAGE = "pretrain"


def stage_epoch(stage: str) -> str:
    """The epoch counter of an earlier stage (``pretrain/epoch``): its history says which epochs are logged."""
    return f"{stage}/epoch"


PRETRAIN_EPOCH = stage_epoch(PRETRAIN_STAGE)
PRETRAIN_TIME = f"{PRETRAIN_STAGE}/time_s"
PRETRAIN_WEIGHTING_FRAC = f"{PRETRAIN_STAGE}/weighting_frac"
MODEL_PARAMS = "model/params"
MODEL_FLOPS = "model/flops_per_sample"
BEST_PREFIX = "best/"  # best/<the task's primary metric>, e.g. best/acc
BEST_ACC = "best/acc"
BEST_EPOCH = "best/epoch"
EVAL_ACC = "eval/acc"
EVAL_ACC_PREFIX = "eval/acc_"  # per answer type: eval/acc_yes_no, ...
EVAL_PRIOR_ACC = "eval/prior_acc"  # the question-type prior's accuracy on the evaluation split
EVAL_AT_PRIOR_SHARE = "eval/at_prior_share"  # share of evaluation questions in types at their prior
EVAL_SOFT_SCORE = "eval/soft_score"
EVAL_LOSS = "eval/loss"
EVAL_N = "eval/n"
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_SAMPLES_PER_S = "train/samples_per_s"
TIME_ELAPSED = "time/elapsed_s"
TIME_TRIAL = "time/trial_s"
#: Per-trial time account (docs/tracking.md): start-up, training and evaluation steps, checkpoints, the rest.
TIME_ACCOUNT = tuple(f"{TIME_NS}{part}" for part in ("startup_s", "train_s", "eval_s", "checkpoint_s", "other_s"))
TIME_WALL = "time/wall_s"
#: Result keys (never MLflow metrics) a failed trial reports to Tune.
RESULT_FAILURE = "trial/failure"
RESULT_FAILURE_KIND = "trial/failure_kind"
#: Metric families a report reads as per-epoch history.
HISTORY_PREFIXES = ("eval/", "train/samples_per_s", "train/loss", "best/", EPOCH, "time/", "layers/")

# ---- artifacts -------------------------------------------------------------------------------------
PREDICTIONS_ARTIFACT = "eval/predictions.csv"
EXAMPLES_ARTIFACT = "eval/examples_top5.json"
HEADS_ARTIFACT = "stats/attention_heads.csv"
BEST_CHECKPOINT_ARTIFACT = "checkpoint/best_model.pt"

# ---- GQA and NLVR2 task adapters (issue 17) --------------------------------------------------------
#: Values of the ``eval.metric`` tag for the two tasks (what their ``eval/acc`` / ``best/acc`` is).
EVAL_METRIC_GQA = "gqa_accuracy"  # the label score of the predicted answer (LXMERT's GQAEvaluator)
EVAL_METRIC_NLVR2 = "nlvr2_accuracy"  # share of statements judged right (LXMERT's NLVR2Evaluator)
EVAL_CONSISTENCY = "eval/consistency"  # NLVR2: share of sentences whose every image pair is right
EVAL_N_LABELLED = "eval/n_labelled"  # questions / statements that carry a label (the accuracy's denominator)
#: Trial tag: how many answers of the task head started from the pretraining QA head (GQA).
INIT_ANSWER_MAP = "init.answer_map"
GQA_SUBMISSION_ARTIFACT = "eval/gqa_submission.json"  # [{"questionId", "prediction"}], GQA's server format
NLVR2_RESULTS_ARTIFACT = "eval/nlvr2_results.csv"  # identifier,True|False per line, as LXMERT writes it

# ---- fine-tuning strategies (issue 15: models/finetune applied by sweeps/loop.py; docs/finetuning.md) ------
PARAM_FINETUNE = "model.finetune.name"
TRAIN_STEP_S = "train/step_s"  # mean seconds per training step of the epoch
TRAIN_RESIDENT_MB = "train/resident_mb"  # parameters, buffers and optimiser state
TRAIN_PEAK_MEM_MB = "train/peak_mem_mb"  # CUDA only: peak allocated in the epoch
FINETUNE_USAGE = "finetune/usage"  # share of SpotTune decisions at "fine-tuned" (training forwards)
FINETUNE_EVAL_USAGE = "finetune/eval_usage"
FINETUNE_USAGE_PREFIX = "finetune/usage/"  # finetune/usage/<stack>/<layer>
FINETUNE_USAGE_TYPE_PREFIX = "finetune/usage_type/"  # finetune/usage_type/<question type>
FINETUNE_POLICY_ENTROPY = "finetune/policy_entropy"
FINETUNE_TEMPERATURE = "finetune/temperature"
FINETUNE_TRAIN_FLOPS = "model/finetune_train_flops"  # analytic fwd + bwd FLOPs per sample
FINETUNE_EVAL_FLOPS = "model/finetune_eval_flops"
FINETUNE_PARAMS_TRAINABLE = "model/finetune_params_trainable"
FINETUNE_PARAMS_FROZEN = "model/finetune_params_frozen"
FINETUNE_PARAMS_POLICY = "model/finetune_params_policy"
FINETUNE_DECISIONS = "model/finetune_decisions"
FINETUNE_USAGE_DIR = "finetune"  # finetune/usage_epoch<N>.csv: per decision, train / eval / per question type

# ---- zero-shot retrieval stage (issue 16; docs/decoupling.md) -----------------------------------------
#: The evaluation-only stage between pretraining and fine-tuning, its MLflow namespace and counter.
RETRIEVAL_STAGE = "retrieval"
RETRIEVAL_EPOCH = stage_epoch(RETRIEVAL_STAGE)
#: Its metrics: ``retrieval/eval_<i2t|t2i>_<r1|r5|r10|medr|meanr|tied>``, ``retrieval/eval_rsum``, ...
RETRIEVAL_PREFIX = "retrieval/eval_"
RETRIEVAL_RECALLS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))
RETRIEVAL_RSUM = "rsum"
#: The config key that turns the stage on, and those the report groups cells by.
PARAM_RETRIEVAL_ENABLED = "retrieval.enabled"
PARAM_RETRIEVAL_SCORING = "retrieval.scoring"
PARAM_FLOW = "model.flow"
PARAM_PRETRAIN_TASKS = "pretrain.tasks"
PARAM_ITM_NEGATIVES = "pretrain.itm_negatives"
PARAM_CONTRASTIVE_NEGATIVES = "pretrain.contrastive_negatives"
#: Per-query ranks of the retrieval stage (``query, index, positive, rank``).
RETRIEVAL_RANKS_ARTIFACT = "retrieval/ranks.csv"
