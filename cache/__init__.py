"""The embedding cache on disk: entries, shards, manifests, locks. Only this package knows HDF5.

Layout under the cache root::

    <key>/spec.json                 the computation that hashes to <key> (`EntrySpec`): backbone,
                                    tokenizer, dtypes, max length, truncation side, prompt, format
    <key>/.lock                     one writer per key (flock: the kernel frees it when a process
                                    dies); its holder writes who it is into it
    <key>/<sel>/shard-00000.h5      a block of rows: emb/<pooling> [rows, layers, hidden] and
                                    text_sha256 [rows, 32]; attributes `key` and `index`
    <key>/<sel>/shard-00000.json    written after the shard: its rows, bytes and sha256
    <key>/<sel>/pending.json        an append in progress: which texts go to which new shard
    <key>/<sel>/manifest.json       written last, by atomic rename: the shards that count
    <key>/<sel>/usage.json          which data sets used the entry, and when (best effort)
    converted/<uid>/gguf-<sha>-v2/  a GGUF backbone de-quantized once, private to its user
                                    (`llmembed.extract.converted`)
    memo-<uid>.json                 the user's remembered file hashes and model facts

The data set is not in the key: rows are addressed by the sha256 of their text (`text_hashes`), so
any split, subset, relabelled or extended file, or plain list of texts is served from what exists,
and a request computes only the texts an entry lacks, appended as new shards. Labels, splits and
ids belong to the data set and are joined at read time by text hash.

`<sel>` names which layers and poolings an entry stores. Any complete entry under `<key>` whose
selection covers a request's layers and poolings serves it; a request for layers or poolings that
no selection stores makes a new selection (with the configured layers and poolings as well), so a
sweep over layers after one full extraction never runs the model.
"""
