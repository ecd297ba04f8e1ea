"""Machine translation (paper Table 7, WMT14): fairseq data-bin reader, token batching, pre-norm
encoder-decoder Transformer with an optionally cached (GRC) encoder, beam search, BLEU.

Modules: ``dictionary`` (fairseq's dict.txt), ``indexed`` (mmap and TNTIDX .idx/.bin via numpy memmap),
``batching`` (fairseq's token batches, sharded, resumable), ``data`` (the data module). See docs/translation.md.
"""
