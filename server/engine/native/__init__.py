"""The native engine (engine.py). Words used throughout, each with one meaning:

- sequence: one prompt's generation, from admission to its last token (sequence.py);
- row: a sequence as one row of a step's batch tensors (logits, positions, block
  tables); an NBCE request's rows are its contexts' sequences, a beam's rows the
  sequences that hold its hypotheses;
- block: 16 token slots of the KV pool (kv_cache.py); slot: one token's place in it;
- chunk: the part of a prompt one step prefills (scheduler.py);
- entry: one key/value pair of a knowledge base, by its index;
- base: a knowledge base (server/knowledge.py); the rotary base is `rope_base`.
"""
