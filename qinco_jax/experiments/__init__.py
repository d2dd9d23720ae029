"""Experiments: measuring models and comparing them with what users would otherwise pick.

    evaluation   a model's reconstruction MSE and recalls on a data set (eval_qinco)
    baselines    faiss IVF-PQ / IVF-RQ at the same code size, their sweeps and the summary
    main_job     the main job (`make demo`): IVF-QINCo(2) against the baselines on real data
    timing       best-of-n wall-clock timing (the benchmarks of bench/)
    reference    the PyTorch references' modules, imported from a checkout for comparisons
"""
