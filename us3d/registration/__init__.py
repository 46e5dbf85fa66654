"""Registration of 3D ultrasound volumes: displacement fields and their metrics, classical
(SimpleITK demons) registration. Fields follow ITK: on the fixed grid, in mm, LPS components,
and the warped moving volume is moving(x + d(x))."""
