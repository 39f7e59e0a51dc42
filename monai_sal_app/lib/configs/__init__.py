"""TaskConfigs: one :class:`~monai_sal_app.lib.configs.classifier.ClassifierConfig` per served checkpoint."""
