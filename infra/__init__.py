"""Infrastructure under the STAR/ADORE scripts: file I/O and flag types, token meta files, run files, the BEIR
reader, embedding memmaps, the encoding plan and encoding, exact search, ADORE's training index, the training loop
with its optimisation, batching and checkpoints, and the distributed helpers.  Nothing here imports the top-level
stage modules (preprocess, dataset, model, retrieve_utils) or the drivers."""
