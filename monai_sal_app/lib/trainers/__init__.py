"""Train tasks: :class:`~monai_sal_app.lib.trainers.classifier.ClassifierTrainer`."""
