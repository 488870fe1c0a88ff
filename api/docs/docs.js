// Swagger UI for this API's own document; kept out of the HTML so the CSP needs no inline code.
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: new URL("/openapi.json", window.location.href).href,
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout",
    // No validator badge: it would send the document to an online service.
    validatorUrl: null,
    persistAuthorization: false,
  });
});
