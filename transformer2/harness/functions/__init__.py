"""Functions that the task YAMLs written by `transformer2.harness.task_configs` name with
`!function transformer2.harness.functions.<module>.<name>`.

- `code`: pass@k for mbpp / humaneval, run in `transformer2.sandbox` (never lm-eval's
  unsandboxed `code_eval`), and the bits of lm-eval's code-task utils we must not import;
- `hendrycks`: one MATH file filtered into lm-eval's seven hendrycks_math subject tasks;
- `paper`: the paper-style `t2_<task>` tasks of every registered task.

Importing this package is cheap; each module imports only what it needs.
"""
