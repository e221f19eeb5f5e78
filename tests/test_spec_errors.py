"""Broken job specs and the exact problems ``load_spec`` reports for them.

Messages are interface: each case lists every ``str(problem)`` line word for word, in the order
``SpecError`` sorts them. ``F`` at the start of an expected line stands for the spec file's path.
A case marked xfail(strict=True) spells the message the loader *should* give; it flips when fixed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from cmbagent_batch.errors import Problem, SpecError
from cmbagent_batch.spec import load_spec, loader
from cmbagent_batch.spec.yamlio import parse_yaml, read_bytes

# A valid spec of 7 lines; cases append to it, so what they add starts at line 8.
BASE = """\
version: 1
job:
  name: demo
tasks:
  - id: a
    kind: shell
    run: echo a
"""

# Appended to BASE, this defines one priced model, "mini", at lines 8-12.
MODELS = """\
llm:
  models:
    mini:
      model: gpt-4o-mini
      price: {prompt_per_1m: 0.15, completion_per_1m: 0.6}
"""

# Appended to BASE, this defines one local model, "smol", at lines 8-12.
LOCAL = """\
llm:
  models:
    smol:
      provider: local
      price: {prompt_per_1m: 0, completion_per_1m: 0}
"""

SLURM_TIME_HELP = "use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
NO_PRICE = (
    "model 'mini' (cmb-finetune-7b) is not in the shipped price table builtin-2025-08: add price: {prompt_per_1m: ..., completion_per_1m: ...} "
    "(write 0 for a free model; costs are never assumed to be $0)"
)
TOP_KEYS = "analysis, execution, job, llm, slurm, tasks, version"
TASK_KEYS = (
    "agent, args, budget_usd, call, code_execution, depends_on, description, env, estimate, id, inputs, "
    "instructions, kind, late_inputs, matrix, max_turns, model, models, outputs, resources, retries, run, timeout, "
    "when_unplaceable"
)

# "Billion laughs": nine levels, each nine aliases of the one before (9**10 leaves once expanded).
ALIAS_BOMB = "".join(
    [
        'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n',
        *(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10)),
    ]
)


def bug(reason: str) -> Any:
    return pytest.mark.xfail(strict=True, reason=reason)


def case(name: str, text: str | bytes, *expected: str, marks: Any = ()) -> Any:
    return pytest.param(text, list(expected), id=name, marks=marks)


CASES = [
    # --- YAML syntax -------------------------------------------------------------------------
    case(
        "yaml-bad-indentation",
        "version: 1\njob:\n  name: demo\n tasks:\n  - id: a\n",
        "F:4:2: $: invalid YAML: while parsing a block mapping started at line 1, column 1: did not find expected key",
    ),
    case(
        "yaml-key-indented-under-scalar",
        "version: 1\njob:\n  name: demo\n    extra: 1\ntasks:\n  - id: a\n    kind: shell\n    run: echo a\n",
        "F:4:10: $: invalid YAML: mapping values are not allowed in this context",
    ),
    case(
        "yaml-unclosed-brace",
        "version: 1\njob: {name: demo\ntasks:\n  - id: a\n    kind: shell\n    run: echo a\n",
        "F:3:6: $: invalid YAML: while parsing a flow mapping started at line 2, column 6: "
        "did not find expected ',' or '}'",
    ),
    case(
        "yaml-unclosed-bracket-at-eof",
        BASE + "    outputs: [a.txt, b.txt\n",
        "F:9:1: $: invalid YAML: while parsing a flow sequence started at line 8, column 14: "
        "did not find expected ',' or ']'",
    ),
    case(
        "yaml-tab-indentation",
        "version: 1\njob:\n\tname: demo\ntasks:\n  - id: a\n    kind: shell\n    run: echo a\n",
        "F:3:1: $: invalid YAML: a tab character cannot indent YAML; indent with spaces",
    ),
    case(
        "yaml-undefined-alias",
        BASE + "execution: *defaults\n",
        "F:8:12: $: invalid YAML: found undefined alias",
    ),
    case(
        "yaml-several-documents",
        BASE + "---\n" + BASE,
        "F:8:1: $: expected one YAML document, found several (remove the extra '---')",
    ),
    case(
        "yaml-python-object-tag",
        BASE + "    description: !!python/object:os.system {}\n",
        "F:8:18: $.tasks[0].description (task 'a'): unsupported YAML tag '!!python/object:os.system'",
    ),
    case(
        "yaml-custom-tag",
        BASE.replace("name: demo", "name: !env JOB_NAME"),
        "F:3:9: $.job.name: unsupported YAML tag '!env'",
    ),
    case(
        "yaml-int-tag-on-text",
        BASE.replace("version: 1", "version: !!int 'one'"),
        "F:1:10: $.version: invalid !!int value 'one'",
    ),
    case(
        "yaml-float-tag-on-text",
        BASE + "    timeout: !!float 'soon'\n",
        "F:8:14: $.tasks[0].timeout (task 'a'): invalid !!float value 'soon'",
    ),
    case(
        "yaml-bool-tag-on-yes",
        BASE + "execution:\n  keep_going: !!bool 'yes'\n",
        "F:9:15: $.execution.keep_going: invalid !!bool value 'yes' (use true or false)",
    ),
    case(
        "yaml-alias-bomb",
        ALIAS_BOMB,
        "F:1:1: $: aliases expand 30 YAML nodes to 4,412,961,516: refused as an alias bomb "
        "(at most 100x expansion over 1,000,000 nodes)",
    ),
    case(
        "yaml-merge-of-scalar",
        BASE + "execution:\n  <<: 1\n",
        "F:9:3: $.execution: '<<' merges a mapping or a list of mappings",
    ),
    case(
        "yaml-list-as-key",
        BASE + "? [a, b]\n: 1\n",
        "F:8:3: $: a key must be a plain string, not a list or mapping",
    ),
    # --- what the file holds -----------------------------------------------------------------
    case("file-empty", "", "F: the file is empty"),
    case("file-only-whitespace", "\n   \n\n", "F: the file is empty"),
    case("file-only-comments", "# a spec, one day\n\n  # maybe\n", "F: the file is empty"),
    case(
        "file-is-a-list",
        "- version: 1\n- job: {name: demo}\n",
        "F:1:1: $: a job spec is a mapping (version, job, tasks, ...), got a list",
    ),
    case(
        "file-is-a-string",
        "hello\n",
        "F:1:1: $: a job spec is a mapping (version, job, tasks, ...), got the string 'hello'",
    ),
    case(
        "file-is-a-number",
        "42\n",
        "F:1:1: $: a job spec is a mapping (version, job, tasks, ...), got the number 42",
    ),
    case("file-binary", bytes(range(256)) * 4, "F: binary file, not YAML text"),
    case("file-text-then-nul", b"version: 1\x00\x01\x02\xff", "F: binary file, not YAML text"),
    case("file-latin-1", b"version: 1\njob:\n  name: d\xe9mo\n", "F:3:1: $: not UTF-8 text (bad byte 0xe9)"),
    # --- duplicate keys ----------------------------------------------------------------------
    case("duplicate-top-level-key", BASE + "version: 1\n", "F:8:1: $.version: duplicate key 'version' (first defined at line 1)"),
    case("duplicate-key-in-task", BASE + "    run: echo b\n", "F:8:5: $.tasks[0].run (task 'a'): duplicate key 'run' (first defined at line 7)"),
    case(
        "duplicate-key-in-flow-mapping",
        BASE.replace("job:\n  name: demo\n", "job: {name: demo, name: other}\n"),
        "F:2:19: $.job.name: duplicate key 'name' (first defined at line 2)",
    ),
    # --- unknown keys ------------------------------------------------------------------------
    case("unknown-top-level-key-hint", BASE + "executon:\n  max_workers: 2\n", "F:8:1: $.executon: unknown key 'executon' (did you mean 'execution'?)"),
    case("unknown-task-key-hint", BASE + "    dependson: [b]\n", "F:8:5: $.tasks[0].dependson (task 'a'): unknown key 'dependson' (did you mean 'depends_on'?)"),
    case("unknown-execution-key-hint", BASE + "execution:\n  max_worker: 2\n", "F:9:3: $.execution.max_worker: unknown key 'max_worker' (did you mean 'max_workers'?)"),
    case(
        "unknown-model-key-hint",
        BASE + MODELS + "      base_ulr: http://127.0.0.1:8000/v1\n",
        "F:13:7: $.llm.models.mini.base_ulr: unknown key 'base_ulr' (did you mean 'base_url'?)",
    ),
    case(
        "misspelt-price-is-also-a-missing-price",
        BASE + MODELS.replace("price:", "prices:").replace("gpt-4o-mini", "cmb-finetune-7b"),
        f"F:10:5: $.llm.models.mini: {NO_PRICE}",
        "F:12:7: $.llm.models.mini.prices: unknown key 'prices' (did you mean 'price'?)",
    ),
    case("unknown-slurm-key-hint", BASE + "slurm:\n  partiton: debug\n", "F:9:3: $.slurm.partiton: unknown key 'partiton' (did you mean 'partition'?)"),
    case("unknown-top-level-key-lists-valid", BASE + "colour: blue\n", f"F:8:1: $.colour: unknown key 'colour'; valid keys: {TOP_KEYS}"),
    case("unknown-task-key-lists-valid", BASE + "    zzz: 1\n", f"F:8:5: $.tasks[0].zzz (task 'a'): unknown key 'zzz'; valid keys: {TASK_KEYS}"),
    case("number-as-top-level-key", BASE + "1: x\n", f"F:8:1: $['1']: unknown key '1'; valid keys: {TOP_KEYS}"),
    # --- types and values --------------------------------------------------------------------
    case("string-for-integer", BASE + "execution:\n  max_workers: two\n", "F:9:16: $.execution.max_workers: expected an integer, got the string 'two'"),
    case("underscored-number-is-a-string", BASE + "execution:\n  max_workers: 1_000\n", "F:9:16: $.execution.max_workers: expected an integer, got the string '1_000'"),
    case("list-for-mapping", BASE + "execution:\n  - max_workers: 2\n", "F:9:3: $.execution: expected a mapping, got a list"),
    case("mapping-for-list", BASE + "    outputs: {a: b}\n", "F:8:14: $.tasks[0].outputs (task 'a'): expected a list, got a mapping"),
    case("bool-for-number", BASE + "execution:\n  task_timeout: true\n", "F:9:17: $.execution.task_timeout: expected a number, got true"),
    case("null-for-mapping", "version: 1\njob:\ntasks:\n  - id: a\n    kind: shell\n    run: echo a\n", "F:2:5: $.job: expected a mapping, got null"),
    case("number-for-id", BASE.replace("id: a", "id: 12"), "F:5:9: $.tasks[0].id: expected a string, got the number 12"),
    case("below-minimum", BASE + "execution:\n  max_workers: 0\n", "F:9:16: $.execution.max_workers: must be at least 1, got the number 0"),
    case(
        "nan-budget",
        BASE.replace("name: demo", "name: demo\n  budget_usd: .nan"),
        "F:4:15: $.job.budget_usd: not-a-number (.nan) is not allowed in a job spec",
    ),
    case(
        "nan-timeout",
        BASE + "execution:\n  task_timeout: .nan\n",
        "F:9:17: $.execution.task_timeout: not-a-number (.nan) is not allowed in a job spec",
    ),
    case(
        "nan-price",
        BASE + MODELS.replace("prompt_per_1m: 0.15", "prompt_per_1m: .nan"),
        "F:12:30: $.llm.models.mini.price.prompt_per_1m: not-a-number (.nan) is not allowed in a job spec",
    ),
    case(
        "enum-hint",
        BASE + "execution:\n  backend: mpii\n",
        "F:9:12: $.execution.backend: the string 'mpii' is not one of: auto, local, mpi (did you mean 'mpi'?)",
    ),
    case(
        "enum-kind-hint",
        BASE.replace("kind: shell", "kind: shel"),
        "F:6:11: $.tasks[0].kind (task 'a'): the string 'shel' is not one of: shell, python, agent (did you mean 'shell'?)",
    ),
    case("version-2", BASE.replace("version: 1", "version: 2"), "F:1:10: $.version: expected 1, got the number 2"),
    case("missing-version", BASE.replace("version: 1\n", ""), "F:1:1: $: missing required key 'version'"),
    case("missing-job-name", BASE.replace("name: demo", "run_dir: out"), "F:3:3: $.job: missing required key 'name'"),
    case("bad-job-name", BASE.replace("name: demo", "name: my job"), "F:3:9: $.job.name: invalid value 'my job': a job name uses letters, digits, '_', '.', '-' and starts with a letter, digit or '_'"),
    case("missing-tasks", "version: 1\njob:\n  name: demo\n", "F:1:1: $: missing required key 'tasks'"),
    case("empty-tasks", "version: 1\njob:\n  name: demo\ntasks: []\n", "F:4:8: $.tasks: must not be an empty list"),
    case(
        "null-and-list-tasks",
        "version: 1\njob:\n  name: demo\ntasks:\n  -\n  - []\n",
        "F:5:4: $.tasks[0]: expected a mapping, got null",
        "F:6:5: $.tasks[1]: expected a mapping, got a list",
    ),
    case(
        "bad-env-var-names",
        BASE + "    env:\n      1BAD: x\n      OK: y\n      A-B: z\n",
        "F:9:7: $.tasks[0].env['1BAD'] (task 'a'): invalid name '1BAD': an environment variable name uses letters, digits, '_' and does not start with a digit",
        "F:11:7: $.tasks[0].env['A-B'] (task 'a'): invalid name 'A-B': an environment variable name uses letters, digits, '_' and does not start with a digit",
    ),
    case(
        "bad-env-values",
        BASE + "    env:\n      A: [1]\n      B:\n",
        "F:9:10: $.tasks[0].env.A (task 'a'): expected a string or a number or true or false, got a list",
        "F:10:9: $.tasks[0].env.B (task 'a'): expected a string or a number or true or false, got null",
    ),
    # --- task kinds --------------------------------------------------------------------------
    case("shell-without-run", BASE.replace("    run: echo a\n", ""), "F:5:5: $.tasks[0] (task 'a'): a shell task needs 'run'"),
    case("python-without-call", BASE.replace("kind: shell\n    run: echo a", "kind: python"), "F:5:5: $.tasks[0] (task 'a'): a python task needs 'call'"),
    case(
        "agent-without-instructions",
        BASE.replace("kind: shell\n    run: echo a", "kind: agent\n    model: mini") + MODELS,
        "F:5:5: $.tasks[0] (task 'a'): an agent task needs 'instructions'",
    ),
    case("task-without-kind", BASE.replace("    kind: shell\n", ""), "F:5:5: $.tasks[0] (task 'a'): missing required key 'kind'"),
    case(
        "run-on-python-task",
        BASE.replace("kind: shell", "kind: python\n    call: cmbtoy:main"),
        "F:8:5: $.tasks[0].run (task 'a'): 'run' is for shell tasks; this is a python task",
    ),
    case(
        "bad-call-format",
        BASE.replace("kind: shell\n    run: echo a", "kind: python\n    call: cmbtoy.main"),
        "F:7:11: $.tasks[0].call (task 'a'): invalid value 'cmbtoy.main': expected 'package.module:function'",
    ),
    # --- ids and dependencies ----------------------------------------------------------------
    case(
        "unknown-dependency-hint",
        BASE.replace("id: a", "id: fetch") + "  - id: b\n    kind: shell\n    run: echo b\n    depends_on: [fetc]\n",
        "F:11:18: $.tasks[1].depends_on[0] (task 'b'): unknown task 'fetc' (did you mean 'fetch'?)",
    ),
    case(
        "dependency-glob-matches-nothing",
        BASE + "  - id: b\n    kind: shell\n    run: echo b\n    depends_on: ['sim-*']\n",
        "F:11:18: $.tasks[1].depends_on[0] (task 'b'): 'sim-*' matches no task",
    ),
    case("self-dependency", BASE + "    depends_on: [a]\n", "F:8:18: $.tasks[0].depends_on[0] (task 'a'): task 'a' depends on itself"),
    case(
        "duplicate-task-id",
        BASE + "  - id: a\n    kind: shell\n    run: echo b\n",
        "F:8:9: $.tasks[1].id: duplicate task id 'a': also made by $.tasks[0]",
    ),
    case(
        "duplicate-task-id-after-matrix-expansion",
        BASE + "  - id: x{n}\n    kind: shell\n    run: echo {n}\n    matrix:\n      n: [1, 2]\n"
        "  - id: x{m}\n    kind: shell\n    run: echo {m}\n    matrix:\n      m: [2, 3]\n",
        "F:13:9: $.tasks[2].id: duplicate task id 'x2' (with m=2): also made by $.tasks[1] (n=2)",
    ),
    case(
        "dependency-cycle-of-three",
        "version: 1\njob:\n  name: demo\ntasks:\n"
        "  - id: a\n    kind: shell\n    run: echo a\n    depends_on: [c]\n"
        "  - id: b\n    kind: shell\n    run: echo b\n    depends_on: [a]\n"
        "  - id: c\n    kind: shell\n    run: echo c\n    depends_on: [b]\n",
        "F:8:18: $.tasks[0].depends_on[0] (task 'a'): dependency cycle: a -> c -> b -> a ('->' reads 'depends on')",
    ),
    case(
        "same-output-twice-read-by-a-third-task",
        BASE + "    outputs: [x.txt]\n  - id: b\n    kind: shell\n    run: echo b\n    outputs: [./x.txt]\n"
        "  - id: c\n    kind: shell\n    run: cat x.txt\n    inputs: [x.txt]\n",
        "F:16:14: $.tasks[2].inputs[0] (task 'c'): input 'x.txt' is ambiguous: 'x.txt' is written by 'a', 'b'",
    ),
    case(
        "paths-escaping-the-work-directory",
        BASE + "    inputs: [/etc/passwd, ../up.txt, ~/x]\n    outputs: [a/../../b, ok.txt]\n",
        "F:8:14: $.tasks[0].inputs[0] (task 'a'): absolute path '/etc/passwd' escapes the task's work directory; use a relative path",
        "F:8:27: $.tasks[0].inputs[1] (task 'a'): path '../up.txt' uses '..' and escapes the task's work directory",
        "F:8:38: $.tasks[0].inputs[2] (task 'a'): absolute path '~/x' escapes the task's work directory; use a relative path",
        "F:9:15: $.tasks[0].outputs[0] (task 'a'): path 'a/../../b' uses '..' and escapes the task's work directory",
    ),
    case(
        "id-with-a-slash",
        BASE.replace("id: a", "id: a/b"),
        "F:5:9: $.tasks[0].id: invalid value 'a/b': task ids may only use letters, digits, '_', '.', '-' (and '{PARAM}' placeholders in a matrix task)",
    ),
    case(
        "id-placeholder-without-matrix",
        BASE.replace("id: a", "id: a-{n}"),
        "F:5:9: $.tasks[0].id: id 'a-{n}' has a placeholder that is not a matrix parameter",
    ),
    case(
        "id-placeholder-not-a-parameter",
        BASE.replace("id: a", "id: a-{m}") + "    matrix:\n      n: [1]\n",
        "F:5:9: $.tasks[0].id: id 'a-{m}' has a placeholder that is not a matrix parameter",
    ),
    # --- models ------------------------------------------------------------------------------
    case(
        "agent-model-undefined-hint",
        BASE.replace("kind: shell\n    run: echo a", "kind: agent\n    instructions: go\n    model: mino") + MODELS,
        "F:8:12: $.tasks[0].model (task 'a'): model 'mino' is not defined in llm.models (did you mean 'mini'?)",
    ),
    case(
        "agent-without-model-or-default",
        BASE.replace("kind: shell\n    run: echo a", "kind: agent\n    instructions: go") + MODELS,
        "F:5:5: $.tasks[0] (task 'a'): an agent task needs a model: set model here or llm.default_model",
    ),
    case(
        "matrix-agent-model-undefined-once",
        BASE + "  - id: s{n}\n    kind: agent\n    instructions: go\n    model: mini\n    matrix:\n      n: [1, 2, 3]\n",
        "F:11:12: $.tasks[1].model (task 's{n}'): model 'mini' is not defined in llm.models",
    ),
    case(
        "task-models-undefined-hint",
        BASE + "    models: [mini, mnii]\n" + MODELS,
        "F:8:20: $.tasks[0].models[1] (task 'a'): model 'mnii' is not defined in llm.models (did you mean 'mini'?)",
    ),
    case(
        "agent-task-with-models",
        BASE.replace("kind: shell\n    run: echo a", "kind: agent\n    instructions: go\n    model: mini")
        + "    models: [mini]\n" + MODELS,
        "F:9:13: $.tasks[0].models (task 'a'): an agent task calls its model: give it model, not models",
    ),
    case(
        "analysis-model-undefined-hint",
        BASE + MODELS + "analysis:\n  sources: [explicit, llm]\n  model: mnii\n",
        "F:15:10: $.analysis.model: model 'mnii' is not defined in llm.models (did you mean 'mini'?)",
    ),
    case(
        "llm-analysis-without-model",
        BASE + MODELS + "analysis:\n  sources: [explicit, llm]\n",
        "F:14:12: $.analysis.sources: 'llm' analysis needs a model: set analysis.model or llm.default_model",
    ),
    case(
        "default-model-undefined",
        BASE + MODELS.replace("  models:", "  default_model: maxi\n  models:"),
        "F:9:18: $.llm.default_model: model 'maxi' is not defined in llm.models",
    ),
    case(
        "agent-without-code-execution-declares-two-outputs",
        BASE.replace("kind: shell", "kind: agent").replace("run: echo a", "instructions: go\n    outputs: [a.md, b.md]")
        + MODELS.replace("  models:", "  default_model: mini\n  models:"),
        "F:8:14: $.tasks[0].outputs (task 'a'): an agent task without code_execution writes one file, its final answer: "
        "declare one output, or set code_execution: true so that its code can write more",
    ),
    case(
        "model-without-price",
        BASE + "llm:\n  default_model: mini\n  models:\n    mini:\n      model: cmb-finetune-7b\n",
        f"F:11:5: $.llm.models.mini: {NO_PRICE}",
    ),
    # --- local models (provider: local) -----------------------------------------------------
    case(
        "local-model-with-endpoint-keys",
        BASE + LOCAL + "      base_url: http://127.0.0.1:8000/v1\n      api_key_env: MY_KEY\n",
        "F:13:7: $.llm.models.smol.base_url: 'base_url' is for provider 'openai': a local model is served on "
        "127.0.0.1 by cmbagent-batch itself",
        "F:14:7: $.llm.models.smol.api_key_env: 'api_key_env' is for provider 'openai': a local model needs no API key",
    ),
    case(
        "endpoint-model-with-local-keys",
        BASE + MODELS + "      model_path: m.gguf\n      threads: 4\n      n_ctx: 2048\n      startup_timeout: 30\n",
        *(f"F:{line}:7: $.llm.models.mini.{key}: '{key}' is for provider 'local': this model is reached at an "
          "endpoint (provider 'openai'); set provider: local to run it here"
          for line, key in ((13, "model_path"), (14, "threads"), (15, "n_ctx"), (16, "startup_timeout"))),
    ),
    case(
        "local-model-needs-a-price-even-with-a-priced-name",
        BASE + LOCAL.replace("      price: {prompt_per_1m: 0, completion_per_1m: 0}\n", "      model: gpt-4o-mini\n"),
        "F:10:5: $.llm.models.smol: model 'smol' runs here (provider: local) and needs a price: write price: "
        "{prompt_per_1m: 0, completion_per_1m: 0} (costs are never assumed to be $0)",
    ),
    case("endpoint-model-needs-a-model-name", BASE + MODELS.replace("      model: gpt-4o-mini\n", ""),
         "F:11:7: $.llm.models.mini: missing required key 'model'"),
    case(
        "local-model-too-small-context-and-no-threads",
        BASE + LOCAL + "      n_ctx: 100\n      threads: 0\n",
        "F:13:14: $.llm.models.smol.n_ctx: must be at least 256, got the number 100",
        "F:14:16: $.llm.models.smol.threads: must be at least 1, got the number 0",
    ),
    # --- slurm -------------------------------------------------------------------------------
    *(
        case(
            f"slurm-time-{text}",
            BASE + f"slurm:\n  time: {text}\n",
            f"F:9:9: $.slurm.time: malformed Slurm time {shown}: {SLURM_TIME_HELP}",
        )
        for text, shown in [
            ('"25:61:00"', "'25:61:00'"),
            ('"1-25"', "'1-25'"),
            ("abc", "'abc'"),
            ('"90:00:99"', "'90:00:99'"),
            ('"60:99"', "'60:99'"),
            ('"1-"', "'1-'"),
            ("-5", "-5"),
        ]
    ),
    case("slurm-time-float", BASE + "slurm:\n  time: 1.5\n", "F:9:9: $.slurm.time: expected a string or an integer, got the number 1.5"),
    case("slurm-bad-mem", BASE + "slurm:\n  mem: 16 GB\n", "F:9:8: $.slurm.mem: invalid value '16 GB': expected a size such as 4000, 16G or 512M"),
    # --- matrix ------------------------------------------------------------------------------
    case(
        "matrix-empty-list",
        BASE.replace("id: a", "id: a{n}") + "    matrix:\n      n: []\n",
        "F:9:10: $.tasks[0].matrix.n (task 'a{n}'): must not be an empty list",
    ),
    case(
        "matrix-empty-mapping",
        BASE + "    matrix: {}\n",
        "F:8:13: $.tasks[0].matrix (task 'a'): must not be an empty mapping",
    ),
    case(
        "matrix-exclude-unknown-parameter",
        BASE.replace("id: a", "id: a{n}") + "    matrix:\n      n: [1, 2]\n      exclude:\n        - {m: 1}\n",
        "F:11:15: $.tasks[0].matrix.exclude[0].m (task 'a{n}'): 'm' is not a matrix parameter",
    ),
    case(
        "matrix-include-lacks-parameter",
        BASE.replace("id: a", "id: a{n}-{m}") + "    matrix:\n      n: [1, 2]\n      m: [x]\n      include:\n        - {n: 3}\n",
        "F:12:11: $.tasks[0].matrix.include[0] (task 'a{n}-{m}'): include entry lacks parameter 'm'",
    ),
    case(
        "matrix-expands-to-nothing",
        BASE.replace("id: a", "id: a{n}") + "    matrix:\n      n: [1, 2]\n      exclude:\n        - {n: 1}\n        - {n: 2}\n",
        "F:9:7: $.tasks[0].matrix (task 'a{n}'): matrix expands to no tasks (every combination is excluded)",
    ),
    case(
        "matrix-bad-parameter-name",
        BASE + "    matrix:\n      a-b: [1]\n",
        "F:9:7: $.tasks[0].matrix['a-b'] (task 'a'): invalid name 'a-b': a matrix parameter name uses letters, digits, '_' and does not start with a digit",
    ),
    case(
        "matrix-repeated-problem-summed-up",
        BASE + "  - id: s{n}\n    kind: shell\n    run: echo\n    depends_on: [nope]\n    matrix:\n      n: [1, 2, 3, 4, 5]\n",
        "F:11:18: $.tasks[1].depends_on[0] (task 's{n}'): unknown task 'nope' (with n=1)",
        "F:11:18: $.tasks[1].depends_on[0] (task 's{n}'): unknown task 'nope' (with n=2)",
        "F:11:18: $.tasks[1].depends_on[0] (task 's{n}'): unknown task 'nope' (with n=3)",
        "F:11:18: $.tasks[1].depends_on[0] (task 's{n}'): ... and 2 more problems like these here",
    ),
    # --- everything at once ------------------------------------------------------------------
    case(
        "ten-problems-in-one-file",
        """\
version: 2
job:
  name: demo
executon:
  max_workers: 0
tasks:
  - id: fetch
    kind: shell
    outputs: [/tmp/x]
  - id: fit
    kind: python
    call: fit:main
    run: echo
    depends_on: [fech]
  - id: fetch
    kind: agent
    instructions: go
    model: mini
slurm:
  time: "25:61:00"
  partiton: debug
""",
        "F:1:10: $.version: expected 1, got the number 2",
        "F:4:1: $.executon: unknown key 'executon' (did you mean 'execution'?)",
        "F:7:5: $.tasks[0] (task 'fetch'): a shell task needs 'run'",
        "F:9:15: $.tasks[0].outputs[0] (task 'fetch'): absolute path '/tmp/x' escapes the task's work directory; use a relative path",
        "F:13:5: $.tasks[1].run (task 'fit'): 'run' is for shell tasks; this is a python task",
        "F:14:18: $.tasks[1].depends_on[0] (task 'fit'): unknown task 'fech' (did you mean 'fetch'?)",
        "F:15:9: $.tasks[2].id: duplicate task id 'fetch': also made by $.tasks[0]",
        "F:18:12: $.tasks[2].model (task 'fetch'): model 'mini' is not defined in llm.models",
        f"F:20:9: $.slurm.time: malformed Slurm time '25:61:00': {SLURM_TIME_HELP}",
        "F:21:3: $.slurm.partiton: unknown key 'partiton' (did you mean 'partition'?)",
    ),
]


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(SpecError) as info:
        load_spec(str(path))
    return info.value.problems


def lines(path: Path, expected: list[str]) -> list[str]:
    assert all(e.startswith("F") for e in expected)
    return [str(path) + e[1:] for e in expected]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_broken_spec(tmp_path: Path, text: str | bytes, expected: list[str]) -> None:
    path = tmp_path / "spec.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    assert [str(p) for p in problems_of(path)] == lines(path, expected)


def test_every_case_has_a_unique_id() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_base_specs_are_valid(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(BASE + MODELS, encoding="utf-8")
    spec = load_spec(str(path))
    assert [t.id for t in spec.tasks] == ["a"]
    assert list(spec.llm.models) == ["mini"]
    path.write_text(BASE + LOCAL, encoding="utf-8")
    assert list(load_spec(str(path)).llm.models) == ["smol"]


@pytest.mark.parametrize(
    ("written", "kept"),
    [
        ('"30"', "30"),
        ("30", "30"),
        ('"1:30:00"', "1:30:00"),
        ("1:30:00", "1:30:00"),
        ('"10:00"', "10:00"),
        ('"100:00:00"', "100:00:00"),
        ('"2-12"', "2-12"),
        ('"2-12:30"', "2-12:30"),
        ('"2-12:30:00"', "2-12:30:00"),
        ("UNLIMITED", "UNLIMITED"),
        ("INFINITE", "INFINITE"),
    ],
)
def test_valid_slurm_times_are_accepted(tmp_path: Path, written: str, kept: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(BASE + f"slurm:\n  time: {written}\n", encoding="utf-8")
    assert load_spec(str(path)).slurm.time == kept


# --- files that cannot be read -------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert problems_of(path) == [Problem(str(path), None, None, "$", "no such file")]
    assert str(problems_of(path)[0]) == f"{path}: no such file"


def test_directory(tmp_path: Path) -> None:
    assert [str(p) for p in problems_of(tmp_path)] == [f"{tmp_path}: is a directory, not a YAML file"]


def test_read_bytes_refuses_a_file_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"#" * 1500)
    with pytest.raises(SpecError) as info:
        read_bytes(str(path), max_bytes=1499)
    assert [str(p) for p in info.value.problems] == [
        f"{path}: file is 1,500 bytes, over the 1,499-byte limit for a job spec"
    ]
    assert read_bytes(str(path), max_bytes=1500) == b"#" * 1500


def test_load_spec_reports_a_file_over_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(BASE.encode().ljust(2048, b"#"))
    monkeypatch.setattr(loader, "read_bytes", functools.partial(read_bytes, max_bytes=1024))
    assert [str(p) for p in problems_of(path)] == [
        f"{path}: file is 2,048 bytes, over the 1,024-byte limit for a job spec"
    ]


# --- exact places ----------------------------------------------------------------------------


def only_problem(tmp_path: Path, text: str | bytes) -> Problem:
    path = tmp_path / "spec.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    (problem,) = problems_of(path)
    return problem


def test_unknown_key_points_at_the_key(tmp_path: Path) -> None:
    p = only_problem(tmp_path, BASE + "execution:\n  retries: 1\n  max_worker: 2\n")
    assert (p.line, p.column, p.path) == (10, 3, "$.execution.max_worker")


def test_duplicate_key_points_at_the_second_and_names_the_first(tmp_path: Path) -> None:
    p = only_problem(tmp_path, BASE + "    run: echo b\n")
    assert (p.line, p.column, p.path) == (8, 5, "$.tasks[0].run")
    assert p.message == "duplicate key 'run' (first defined at line 7)"


def test_wrong_type_points_at_the_value(tmp_path: Path) -> None:
    p = only_problem(tmp_path, BASE + "execution:\n  max_workers:   two\n")
    assert (p.line, p.column, p.path) == (9, 18, "$.execution.max_workers")


def test_missing_key_points_at_the_mapping_that_lacks_it(tmp_path: Path) -> None:
    p = only_problem(tmp_path, BASE + "  - id: b\n    kind: python\n")
    assert (p.line, p.column, p.path) == (8, 5, "$.tasks[1]")


def test_dependency_points_at_the_list_item(tmp_path: Path) -> None:
    p = only_problem(tmp_path, BASE + "  - id: b\n    kind: shell\n    run: echo b\n    depends_on: [a, c]\n")
    assert (p.line, p.column, p.path) == (11, 21, "$.tasks[1].depends_on[1]")


def test_tab_points_at_the_tab(tmp_path: Path) -> None:
    p = only_problem(tmp_path, "version: 1\njob:\n\tname: demo\n")
    assert (p.line, p.column, p.path) == (3, 1, "$")


def test_bad_utf8_points_at_its_line(tmp_path: Path) -> None:
    p = only_problem(tmp_path, BASE.encode() + b"    description: caf\xe9\n")
    assert (p.line, p.column) == (8, 1)
    assert p.message == "not UTF-8 text (bad byte 0xe9)"


def test_whole_file_problem_has_no_place(tmp_path: Path) -> None:
    p = only_problem(tmp_path, "")
    assert (p.line, p.column, p.path) == (None, None, "$")


# --- the YAML 1.2 core schema, merge keys, aliases --------------------------------------------


def test_yes_no_on_off_and_sexagesimal_stay_strings() -> None:
    data = parse_yaml(
        b"a: yes\nb: no\nc: on\nd: off\ne: 1:30:00\nf: y\ng: n\nh: 2001-12-14\n"
        b"i: true\nj: False\nk: ~\nl: null\nm: 0o17\nn: 0x1f\no: 010\np: 1e3\nq: .5\n",
        "f.yaml",
    ).data
    assert data == {
        "a": "yes", "b": "no", "c": "on", "d": "off", "e": "1:30:00", "f": "y", "g": "n", "h": "2001-12-14",
        "i": True, "j": False, "k": None, "l": None, "m": 15, "n": 31, "o": 10, "p": 1000.0, "q": 0.5,
    }
    assert type(data["o"]) is int and type(data["p"]) is float


def test_yes_no_and_times_reach_the_spec_as_written(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        BASE + "    description: no\n    env: {A: yes, B: off, C: on, D: true, E: 1}\nslurm:\n  time: 1:30:00\n",
        encoding="utf-8",
    )
    spec = load_spec(str(path))
    assert spec.slurm.time == "1:30:00"
    assert spec.tasks[0].description == "no"
    assert dict(spec.tasks[0].env) == {"A": "yes", "B": "off", "C": "on", "D": "true", "E": "1"}


def test_merge_keys_fill_in_and_written_keys_win(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        """\
version: 1
job:
  name: demo
tasks:
  - &sim
    id: sim-a
    kind: shell
    run: echo a
    timeout: 60
    retries: 2
    env: {OMP_NUM_THREADS: 4}
  - <<: *sim
    id: sim-b
    run: echo b
    retries: 0
""",
        encoding="utf-8",
    )
    a, b = load_spec(str(path)).tasks
    assert (b.id, b.kind, b.run, b.timeout, b.retries) == ("sim-b", "shell", "echo b", 60, 0)
    assert dict(b.env) == {"OMP_NUM_THREADS": "4"}
    assert (a.id, a.run, a.retries) == ("sim-a", "echo a", 2)


def test_merge_of_several_mappings_earlier_wins() -> None:
    data = parse_yaml(
        b"x: &x {a: 1, b: 1}\ny: &y {b: 2, c: 2}\nz:\n  <<: [*x, *y]\n  c: 3\n", "f.yaml"
    ).data
    assert data["z"] == {"a": 1, "b": 1, "c": 3}
    assert data["x"] == {"a": 1, "b": 1}  # merging does not change the source


def test_aliases_are_shared_not_copied() -> None:
    data = parse_yaml(b"a: &x [1, {k: v}]\nb: *x\nc: {l: *x}\n", "f.yaml").data
    assert data["a"] == [1, {"k": "v"}]
    assert data["b"] is data["a"]
    assert data["c"]["l"] is data["a"]


def test_a_self_referencing_alias_does_not_hang() -> None:
    data = parse_yaml(b"a: &a [1, *a]\n", "f.yaml").data
    assert data["a"][1] is data["a"]


def test_top_level_x_blocks_hold_anchors_for_merge_keys(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "version: 1\n"
        "x-defaults: &defaults\n"
        "  kind: shell\n"
        "  timeout: 60\n"
        "job: {name: demo}\n"
        "tasks:\n"
        "  - <<: *defaults\n"
        "    id: a\n"
        "    run: echo a\n"
        "  - <<: *defaults\n"
        "    id: b\n"
        "    run: echo b\n"
        "    timeout: 5\n",
        encoding="utf-8",
    )
    loaded = load_spec(str(spec))
    assert [(t.id, t.kind, t.timeout) for t in loaded.tasks] == [("a", "shell", 60), ("b", "shell", 5)]


def test_tasks_may_write_the_same_relative_path_when_nobody_reads_it_ambiguously(tmp_path: Path) -> None:
    # Each task publishes under outputs/S/TASK/, so a sweep whose tasks all write out.txt is fine.
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "version: 1\njob: {name: demo}\ntasks:\n"
        "  - id: sim-{i}\n    kind: shell\n    run: echo {i} > out.txt\n    outputs: [out.txt]\n"
        "    matrix: {i: [1, 2, 3]}\n",
        encoding="utf-8",
    )
    assert [t.id for t in load_spec(str(spec)).tasks] == ["sim-1", "sim-2", "sim-3"]
