"""Training: from data to a trained model.

    recipe          the paper's recipe: RQ initialisation -> parameters -> the loop (ModelSpec,
                    train_model)
    loop            the training loop: one compiled data-parallel step, validation, resumable
                    checkpoints, the reference's stopping rule
    qinco2_recipe   QINCo2's recipe pieces: AdamW, cosine schedule, clipping, beam training
    scheduler       QINCo v1's reduce-on-plateau learning-rate schedule and stopping rule
    rq_init         initial codebooks from a faiss ResidualQuantizer (and the exact-RQ start)
    pq              PQ-QINCo: OPQ, split, one QINCo per part, recombine
"""
