"""moeray on Kubernetes (KubeRay): the kustomize base and overlays beside this file, the image recipe
(Dockerfile), `k8s.render` (`moeray k8s render`: an overlay's manifests without kubectl) and
`k8s.serve_config` (the RayService's serveConfigV2, generated from serving/configs/kuberay.yaml).

Nothing here imports the rest of moeray.
"""
