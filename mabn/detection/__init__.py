"""Detection and instance segmentation from scratch with small normalization batches (the paper's
Section 5.2 and appendix B.3): COCO-format data, torchvision detectors built with any normalization
of the ``norm`` group, the COCO evaluator, and the detection task of the shared trainer."""
