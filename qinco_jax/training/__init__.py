"""Training: from data to a trained model.

    recipe          the paper's recipe: RQ initialisation -> parameters -> the loop (ModelSpec,
                    derived from config.QincoConfig; train_model)
    loop            the training loop: TrainState, one compiled data-parallel step, batches
                    read (and prefetched) from memory-mapped files, validation, resumable
                    checkpoints (fit, TrainConfig)
    recipes         what v1 and QINCo2 training do differently, one object each (V1Recipe,
                    Qinco2Recipe): loss, parameter split, optimizer, data order, schedule,
                    codeword reset
    streaming       reading a training set that stays on disk: bounded chunks, batches,
                    faiss's own subsamples, transformed rows (RowMap)
    finetune        training a trained model further (run.py task=train model=<file>)
    qinco2_recipe   QINCo2's recipe pieces: AdamW / Adam, cosine and plateau schedules, clipping, beam training
    monitor         what a person watches: codeword usage (perplexity, entropy, dead codewords
                    per step), TensorBoard event files (TensorBoardMonitor, read_scalars)
    scheduler       QINCo v1's reduce-on-plateau learning-rate schedule and stopping rule
    rq_init         initial codebooks from a faiss ResidualQuantizer (and the exact-RQ start)
    pq              PQ-QINCo: OPQ, split, one QINCo per part, recombine
"""
