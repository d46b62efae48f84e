"""The lm-eval YAML the composition zoo's tasks are written with (`composition.write_task_files`)."""

TASK_DOCS = {
    "comp_math_l2": "the target: two-step arithmetic `ab+c-d=` posed and answered in L2 (no source solves it)",
    "comp_math_l1": "the math expert's task: two-step arithmetic `ab+c-d=` in L1",
    "comp_lang_l2": "the language expert's task: reverse a six-character L2 word",
}
YAML = """\
# Composition zoo task: {doc}.
# Written by evomerge.zoo.composition.write_task_files; data_files are relative to this folder.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: data/{name}_train.jsonl
    validation: data/{name}_validation.jsonl
    test: data/{name}_test.jsonl
training_split: train
validation_split: validation
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: answer
target_delimiter: ""
generation_kwargs:
  until: ["<eos>"]
  max_gen_toks: {max_gen}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
