"""Readers of public evaluation benchmarks in their standard on-disk layouts (no network).

One module per kind, each a ``prepare_data`` source (registered in
:data:`llm2clip.data.sources.SOURCE_READERS`; configs in :mod:`llm2clip.config.benchmarks`):

- :mod:`.karpathy`: COCO / Flickr30k Karpathy split JSON (``kind: karpathy``);
- :mod:`.long_caption`: ShareGPT4V, Urban1k, DOCCI (``kind: long_caption``);
- :mod:`.imagenet`: ImageNet-1k class folders or the val CSV, labels only (``kind: imagenet``);
- :mod:`.caption_table`: COCO-CN / Flickr30k-CN style tables (``kind: caption_table``);
- :mod:`.files`: the file access they share (local and ``s3://``).

Each reads its index (JSON, CSV, folder listing) when opened, so a wrong layout is one clear
:class:`~llm2clip.io.StageError` naming the file and the missing key before any image is read;
the images are read as the samples are iterated, a missing one being a ``missing_image`` sample.
"""
