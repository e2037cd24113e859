"""The Kubeflow side: the pipeline DAG, its compiler, a local runner and a cluster submitter.

    python -m pipelines.compile [--output build/llm2clip_pipeline.yaml]
    python -m pipelines.local [--params params.yaml] [--set section.key=value ...]
    python -m pipelines.submit --host URL --params params/paper-openai-l14-336.yaml [--set ...]
"""
